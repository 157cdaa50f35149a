"""The proxy's threads: every frontend's workers, their start, their failures,
reload on SIGHUP, and stop on SIGINT/SIGTERM.

A generation is one reading of the configuration: for each frontend, its
workers (Proxy objects, each an engine with its own ring on a thread of
its own) and their listening sockets. The sockets belong to the
supervisor, not to a generation: on SIGHUP a new generation is started on
the same sockets for every address it keeps (new ones are opened for new
addresses), its engines start accepting, and only then does the old
generation stop accepting and drain its flows under --drain-timeout. At
no moment is a listening socket closed or left without an accept, so a
client connecting across a reload is never refused. An invalid file is
logged and changes nothing.

The calling thread only waits: for signals (their handlers run between
its joins), for workers to end, and for a reload to do.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading

from . import service
from .config import Config, ConfigError
from .log import Log
from .proxy import Proxy, StartupError, log_stopped, open_listener, sum_stats


@contextlib.contextmanager
def _handlers(sigs: dict, wakeup_fd: int | None = None):
    """Our signal handlers (and wakeup fd) while serving, the caller's after.
    They go in before any listening line: a script that reads the port and
    signals at once must still get a clean exit 0."""
    old = {sig: signal.signal(sig, h) for sig, h in sigs.items()}
    old_wakeup = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False) \
        if wakeup_fd is not None else None
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if wakeup_fd is not None:
            signal.set_wakeup_fd(old_wakeup)


class Generation:
    def __init__(self, number: int):
        self.number = number
        self.groups: list[list[Proxy]] = []     # per frontend, its workers
        self.threads: list[threading.Thread] = []
        self.final: dict[int, list[dict]] = {}  # frontend index -> stats of ended workers
        self.keys: set = set()                  # the listening sockets it uses
        self.errors: list[BaseException] = []
        self.reported = False

    @property
    def proxies(self) -> list[Proxy]:
        return [p for g in self.groups for p in g]


class Supervisor:
    def __init__(self, log: Log, metrics=None, workers: int = 1, cpu_affinity: bool = False,
                 config_path: str | None = None, metrics_endpoint=None):
        self.log = log
        self.metrics = metrics          # the /metrics listening socket, or None
        self.metrics_endpoint = metrics_endpoint
        self.workers = workers
        self.cpu_affinity = cpu_affinity
        self.config_path = config_path
        self.sockets: dict[tuple, list[socket.socket]] = {}   # (host, port) -> per worker
        self.aliases: dict[tuple, tuple] = {}     # (host, frontend) of a port-0 listen -> key
        self.generations: list[Generation] = []
        self.stopping = threading.Event()
        self.reload_asked = threading.Event()
        self.lock = threading.Lock()

    # --- listening sockets: the supervisor's, kept across generations ----------

    def _key(self, name, cfg: Config):
        """The sockets' key: the address as bound. A port of 0 (the kernel's
        pick) is matched by frontend name to what it was bound to."""
        if cfg.listen.port == 0:
            return self.aliases.get((cfg.listen.host, name))
        return (cfg.listen.host, cfg.listen.port)

    def _sockets_for(self, name, cfg: Config) -> tuple:
        """The workers' listening sockets for this frontend, and their key: an
        earlier generation's on the same address, else new ones."""
        key = self._key(name, cfg)
        if key in self.sockets:
            return key, self.sockets[key]
        if self.workers == 1:
            socks = [open_listener(cfg, reuseport=cfg.reuseport)]
        else:
            socks = [open_listener(cfg, reuseport=True)]
            port = socks[0].getsockname()[1]
            try:
                socks += [open_listener(cfg, reuseport=True, port=port)
                          for _ in range(1, self.workers)]
            except ConfigError:
                for s in socks:
                    s.close()
                raise
        key = (cfg.listen.host, socks[0].getsockname()[1])
        if cfg.listen.port == 0:
            self.aliases[(cfg.listen.host, name)] = key
        self.sockets[key] = socks
        return key, socks

    # --- a generation ----------------------------------------------------------

    def launch(self, frontends: list) -> Generation:
        """Start every frontend's workers on their threads, and wait until all
        listen; on any failure none is left running and the error is raised."""
        gen = Generation(len(self.generations))
        engines = len(frontends) * self.workers
        new_keys = []
        try:
            for name, cfg in frontends:
                fresh = self._key(name, cfg) not in self.sockets
                key, socks = self._sockets_for(name, cfg)
                gen.keys.add(key)
                if fresh:
                    new_keys.append(key)
                gen.groups.append([Proxy(cfg, self.log, name, w, self.workers, socks[w], engines)
                                   for w in range(self.workers)])
        except ConfigError as e:
            self._close_keys(new_keys)
            raise ConfigError(f"frontend {name!r}: {e}" if name is not None else str(e)) from None
        if self.metrics is not None:
            # A callable: a replaced worker is counted, not the one it replaced.
            gen.groups[0][0].metrics_at = (self.metrics, lambda: gen.proxies)
        # Listed before any starts: a signal that comes as the first listening
        # line is out must reach every worker (stop() walks this list).
        self.generations.append(gen)
        if gen.number > 0:          # said once, at the first start; a reload says `reloaded`
            for p in gen.proxies:
                p.say = lambda *a, **k: None
        started = [threading.Event() for _ in gen.proxies]
        go = threading.Event()
        for i, p in enumerate(gen.proxies):
            t = threading.Thread(target=self._worker, args=(gen, p, started[i], go),
                                 name=f"{p.name or 'proxy'}-{p.worker}.{gen.number}", daemon=True)
            gen.threads.append(t)
            t.start()
        for ev in started:
            ev.wait()
        go.set()
        if gen.errors:
            for t in gen.threads:
                t.join()
            for p in gen.proxies:
                p.close()
            self.generations.remove(gen)
            self._close_keys(new_keys)
            raise gen.errors[0]
        return gen

    def _close_keys(self, keys):
        for key in keys:
            for s in self.sockets.pop(key, []):
                s.close()
            self.aliases = {a: k for a, k in self.aliases.items() if k != key}

    def _worker(self, gen: Generation, p: Proxy, started: threading.Event, go: threading.Event):
        if self.cpu_affinity:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[gen.proxies.index(p) % len(cpus)]})   # this thread
        fi = next(i for i, g in enumerate(gen.groups) if p in g)
        try:
            if p.worker > 0:
                p.health_from = gen.groups[fi][0].engine
            p.start()
        except (ConfigError, StartupError) as e:
            gen.errors.append(type(e)(f"frontend {p.name!r}: {e}") if p.name is not None else e)
            started.set()
            return
        except BaseException as e:
            gen.errors.append(e)
            started.set()
            return
        started.set()
        go.wait()
        if gen.errors:
            return
        if self.stopping.is_set():
            p.request_stop()        # a stop that came while it was starting
        while True:
            try:
                stats = p.run(report=False)
                with self.lock:
                    gen.final.setdefault(fi, []).append(stats)
                return
            except Exception as e:          # the worker's loop failed: replace it
                if self.stopping.is_set() or self.workers == 1:
                    gen.errors.append(e)
                    self.stop()
                    return
                p = self._replace(gen, fi, p, e)
                if p is None:
                    return

    def _replace(self, gen: Generation, fi: int, p: Proxy, e: Exception):
        self.log.event("worker_failed", frontend=p.name or "default", worker=p.worker,
                       error=str(e), action="replaced")
        if p.engine is not None:
            p.engine.reset_all()        # its clients see a reset, never a hang
            with self.lock:
                gen.final.setdefault(fi, []).append(p.engine.stats())
        p.close()
        q = Proxy(p.cfg, self.log, p.name, p.worker, p.workers, p.given_listener, p.engines)
        q.health_from, q.metrics_at = p.health_from, p.metrics_at
        q.say = lambda *a, **k: None
        try:
            q.start()
        except Exception as e2:
            gen.errors.append(e2)
            self.stop()
            return None
        group = gen.groups[fi]
        group[group.index(p)] = q
        if q.worker == 0:               # the others follow the new checks
            for other in group[1:]:
                if other.engine is not None:
                    other.engine.follow_health(q.engine)
                    other.health_from = q.engine
        if self.stopping.is_set():
            q.request_stop()
        return q

    # --- signals -----------------------------------------------------------------

    def stop(self, *_):
        self.stopping.set()
        for gen in self.generations:
            for p in gen.proxies:
                p.request_stop()

    def ask_reload(self, *_):
        self.reload_asked.set()         # the main thread's next turn (at most 0.2 s)

    def reload(self):
        from . import configfile
        if self.config_path is None:
            self.log.event("reload", result="nothing to do", reason="no --config file; flags "
                           "cannot be re-read")
            return
        try:
            fc = configfile.load(self.config_path)
            if (fc.workers or self.workers) != self.workers:
                raise ConfigError(f"workers {fc.workers}: a change of workers needs a restart "
                                  f"(running {self.workers})")
            if fc.metrics != self.metrics_endpoint:
                raise ConfigError("metrics: a change of the metrics address needs a restart")
            old = self.generations[-1]
            new = self.launch(fc.frontends)
        except (ConfigError, StartupError, OSError) as e:
            self.log.event("reload_failed", reason=str(e), action="running as before")
            return
        # The new engines accept on the same sockets now; the old stop accepting
        # (their cancel may race an accept: that client is served, not dropped)
        # and drain.
        def accept_stopped(p_old):
            # An old engine no longer accepts: the new ones on its socket look at
            # the queue again (a wake-up it took and then dropped is not lost).
            for q in new.proxies:
                if q.given_listener is p_old.given_listener:
                    q.kick_accept()
        for p in old.proxies:
            p.on_accept_stopped = accept_stopped
            p.request_stop(reload=True)
        self.log.event("reloaded", generation=new.number,
                       frontends=",".join(p.name or "default" for p in new.proxies if p.worker == 0),
                       draining=sum(p.engine.active for p in old.proxies if p.engine is not None))
        service.notify("READY=1", f"STATUS=reloaded: generation {new.number}")

    # --- the main thread ---------------------------------------------------------

    def _failed(self, e: Exception) -> int:
        """Exit status 1, with the one line that says why."""
        if isinstance(e, StartupError):
            self.log.raw(f"uring-proxy: error: {e}")
        else:       # io_uring_enter failed in a way the engine cannot ride out
            self.log.raw(f"uring-proxy: error: the io_uring loop failed: {e.strerror or e}")
        return 1

    def serve_inline(self, name, cfg: Config) -> int:
        """One engine and nothing to reload: it runs on this thread, as the
        signals do (set_wakeup_fd wakes its wait). No thread to start or join:
        a start and a stop each cost 0.1 s less, which a suite of hundreds
        of proxies notices."""
        p = Proxy(cfg, self.log, name)
        if self.metrics is not None:
            p.metrics_at = (self.metrics, lambda: [p])

        def hup(*_):
            self.log.event("reload", result="nothing to do", reason="no --config file; flags "
                           "cannot be re-read")
        sigs = {signal.SIGINT: p.request_stop, signal.SIGTERM: p.request_stop, signal.SIGHUP: hup}
        with _handlers(sigs, p.wakeup_w.fileno()):
            try:
                p.start()
                service.notify("READY=1", f"STATUS=listening on {p.address} backend={p.backend} "
                                          f"mode={cfg.mode} workers=1")
                log_stopped(self.log, cfg, p.run(report=False))
                return 0
            except (StartupError, OSError) as e:
                return self._failed(e)
            finally:
                p.close()

    def serve(self, frontends: list) -> int:
        if len(frontends) == 1 and self.workers == 1 and self.config_path is None:
            return self.serve_inline(*frontends[0])
        sigs = {signal.SIGINT: self.stop, signal.SIGTERM: self.stop, signal.SIGHUP: self.ask_reload}
        with _handlers(sigs):
            try:
                return self._serve_threads(frontends)
            except (StartupError, OSError) as e:
                return self._failed(e)
            finally:
                self.stop()
                for g in self.generations:
                    for t in g.threads:
                        t.join(10)
                    for p in g.proxies:
                        p.close()
                for socks in self.sockets.values():
                    for s in socks:
                        s.close()

    def _serve_threads(self, frontends: list) -> int:
        gen = self.launch(frontends)
        where = " ".join(f"{g[0].name + '=' if g[0].name else ''}{g[0].address}"
                         for g in gen.groups)
        service.notify("READY=1", f"STATUS=listening on {where} backend={gen.proxies[0].backend} "
                                  f"mode={gen.proxies[0].cfg.mode} workers={self.workers}")
        while True:
            live = False
            for g in list(self.generations):
                for t in g.threads:
                    if t.is_alive():
                        live = True
                        t.join(0.2)         # signal handlers run between joins
                if not any(t.is_alive() for t in g.threads) and not g.reported:
                    self._report(g)
            if self.reload_asked.is_set() and not self.stopping.is_set():
                self.reload_asked.clear()
                self.reload()
                continue
            if not live:
                break
        errors = [e for g in self.generations for e in g.errors]
        if errors:
            raise errors[0]
        return 0

    def _report(self, gen: Generation):
        """A generation whose workers have all ended: its frontends' stopped lines;
        and the sockets of frontends no later generation kept are closed."""
        gen.reported = True
        for fi, g in enumerate(gen.groups):
            if gen.final.get(fi):
                log_stopped(self.log, g[0].cfg, sum_stats(gen.final[fi]), g[0].name)
        # A frontend the file no longer has: its sockets close once no
        # generation still running uses them.
        live = set().union(*(g.keys for g in self.generations if not g.reported))
        for key in [k for k in self.sockets if k not in live]:
            for s in self.sockets.pop(key):
                s.close()
            self.aliases = {a: k for a, k in self.aliases.items() if k != key}

"""uring-proxy's command line: parse, then hand over to proxy, probe or demo.

Any configuration mistake is one line on stderr and exit status 2; nothing
the user types can produce a traceback.
"""
from __future__ import annotations

import os
import sys

from .config import ConfigError, build_parser, config_from_args
from .log import Log


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["demo"]:
            from . import demo
            return demo.main(argv[1:])
        ns = build_parser().parse_args(argv)
        if ns.probe:
            from . import probe
            return probe.main()
        if ns.check_config:
            from . import configfile
            print(configfile.summary(configfile.load(ns.check_config)))
            return 0
        if ns.config:
            from . import configfile
            if ns.listen or ns.upstream:
                raise ConfigError("--config gives the listeners and upstreams; not with "
                                  "--listen or --upstream")
            fc = configfile.load(ns.config)
            fmt, verbose, frontends = fc.log_format, max(fc.verbose, ns.verbose), fc.frontends
            metrics, path = fc.metrics, ns.config
            workers = ns.workers or fc.workers
            affinity = ns.cpu_affinity or fc.cpu_affinity
        else:
            cfg = config_from_args(ns)
            fmt, verbose, frontends = cfg.log_format, cfg.verbose, [(None, cfg)]
            metrics, path = cfg.metrics, None
            workers, affinity = ns.workers, ns.cpu_affinity
        from .proxy import serve
        log = Log(fmt, verbose)
        log.start_writer()
        try:
            if workers is None:
                workers = len(os.sched_getaffinity(0))
            return serve(frontends, log, metrics, workers, affinity, path)
        finally:
            log.close()
    except ConfigError as e:
        print(f"uring-proxy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

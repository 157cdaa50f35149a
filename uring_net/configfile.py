"""uring-proxy's configuration file (--config FILE, --check-config FILE).

TOML, read with the standard library's tomllib. Every key is a command-line
flag's name with `_` for `-`, and takes the values the flag takes, checked by
the flag's own converter: a file and a command line cannot disagree on what
is valid. The layout:

    [global]            log_format, verbose: the process's
    [defaults]          any frontend key: applies to every frontend
    [[frontend]]        one listener with its own pool: name, listen,
                        upstreams (a list of "HOST:PORT" strings or
                        {address = "HOST:PORT", weight = N} tables), and
                        any key of [defaults], which it overrides

docs/configuration.md lists every key with its default. Nothing starts until
the whole file is valid; a mistake is one ConfigError naming the file, the
frontend and the key (or, for TOML syntax, the line).
"""
from __future__ import annotations

import argparse
import tomllib

from .config import Config, ConfigError, build_parser, config_from_args, parse_endpoint

GLOBAL_KEYS = ("log_format", "verbose", "metrics", "workers", "cpu_affinity")
# Flags that are commands or process-wide, not settings of a frontend.
NOT_FRONTEND = {"help", "probe", "config", "check_config", "upstream", *GLOBAL_KEYS}
FRONTEND_ONLY = ("name", "listen", "upstreams")


class FileConfig:
    """What a config file asks for: the process's settings and its frontends."""

    def __init__(self, path: str, log_format: str, verbose: int, frontends: list[tuple[str, Config]],
                 metrics=None, workers=None, cpu_affinity=False):
        self.path = path
        self.metrics = metrics      # an Endpoint, or None
        self.workers = workers      # None: the command line's, or its default
        self.cpu_affinity = cpu_affinity
        self.log_format = log_format
        self.verbose = verbose
        self.frontends = frontends


def _actions(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in parser._actions if a.dest not in NOT_FRONTEND}


def _text(value, where: str) -> str:
    """A TOML value as the flag's text (what the user would have typed)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number or a string, not a boolean")
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return ",".join(map(str, value))       # tcp_keepalive = [300, 30, 5]
    raise ConfigError(f"{where}: expected a number or a string, not {type(value).__name__}")


def _convert(action, value, where: str):
    if isinstance(action, argparse._StoreTrueAction):       # a switch: true or false
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    text = _text(value, where)
    if action.type is None:
        return text
    try:
        return action.type(text)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _upstream_texts(value, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of \"HOST:PORT\" or "
                          "{address = \"HOST:PORT\", weight = N}")
    out = []
    for i, u in enumerate(value):
        here = f"{where}[{i}]"
        if isinstance(u, str):
            out.append(u)
        elif isinstance(u, dict):
            unknown = set(u) - {"address", "weight"}
            if unknown or "address" not in u or not isinstance(u["address"], str):
                raise ConfigError(f"{here}: a table needs address = \"HOST:PORT\" and may have "
                                  f"weight = N, nothing else" + (f" (not {', '.join(sorted(unknown))})"
                                                                  if unknown else ""))
            w = u.get("weight", 1)
            if not isinstance(w, int) or isinstance(w, bool):
                raise ConfigError(f"{here}.weight: expected a whole number from 1 to 256")
            out.append(f"{u['address']},weight={w}")
        else:
            raise ConfigError(f"{here}: expected \"HOST:PORT\" or a table, not {type(u).__name__}")
    return out


def _settings(table: dict, actions: dict, where: str, allowed_extra=()) -> dict:
    out = {}
    for key, value in table.items():
        if key in allowed_extra:
            continue
        if key not in actions:
            hint = " (it belongs in [global])" if key in GLOBAL_KEYS else \
                   " (only in a [[frontend]])" if key in FRONTEND_ONLY else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; keys are the flags' names "
                              "with _ for - (docs/configuration.md)")
        out[key] = _convert(actions[key], value, f"{where}.{key}")
    return out


def load(path: str) -> FileConfig:
    """Read and check the whole file: a FileConfig, or ConfigError."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = set(doc) - {"global", "defaults", "frontend"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                          "expected [global], [defaults] and [[frontend]]")
    parser = build_parser()
    actions = _actions(parser)
    every = {a.dest: a for a in parser._actions}

    glob = doc.get("global", {})
    if not isinstance(glob, dict):
        raise ConfigError(f"{path}: global must be a table ([global])")
    bad = set(glob) - set(GLOBAL_KEYS)
    if bad:
        raise ConfigError(f"{path}: [global]: unknown key(s) {', '.join(sorted(bad))}; "
                          f"[global] has {', '.join(GLOBAL_KEYS)}")
    log_format = _convert(every["log_format"], glob["log_format"], f"{path}: [global].log_format") \
        if "log_format" in glob else "text"
    verbose = glob.get("verbose", 0)
    if not isinstance(verbose, int) or isinstance(verbose, bool) or not 0 <= verbose <= 2:
        raise ConfigError(f"{path}: [global].verbose: expected 0, 1 or 2")

    defaults_t = doc.get("defaults", {})
    if not isinstance(defaults_t, dict):
        raise ConfigError(f"{path}: defaults must be a table ([defaults])")
    for key in FRONTEND_ONLY:
        if key in defaults_t:
            raise ConfigError(f"{path}: [defaults].{key}: belongs in each [[frontend]]")
    defaults = _settings(defaults_t, actions, f"{path}: [defaults]")

    fronts = doc.get("frontend")
    if not isinstance(fronts, list) or not fronts:
        raise ConfigError(f"{path}: no [[frontend]]: at least one listener is needed")
    base = {}
    for dest, a in actions.items():
        d = a.default
        base[dest] = a.type(d) if isinstance(d, str) and a.type is not None else d
    frontends, names, listens = [], set(), {}
    for i, ft in enumerate(fronts):
        name = ft.get("name", f"frontend{i + 1}")
        where = f"{path}: [[frontend]] {name!r}" if "name" in ft else f"{path}: [[frontend]] #{i + 1}"
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ConfigError(f"{where}.name: expected a name without spaces")
        if name in names:
            raise ConfigError(f"{where}: a second frontend named {name!r}")
        names.add(name)
        if "listen" not in ft or "upstreams" not in ft:
            raise ConfigError(f"{where}: needs listen = \"HOST:PORT\" and upstreams = [...]")
        ns = argparse.Namespace(**base, log_format=log_format, verbose=verbose)
        vars(ns).update(defaults)
        vars(ns).update(_settings(ft, actions, where, allowed_extra=("name", "upstreams")))
        ns.upstream = _upstream_texts(ft["upstreams"], f"{where}.upstreams")
        try:
            cfg = config_from_args(ns)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        key = (cfg.listen.host, cfg.listen.port)
        if cfg.listen.port and key in listens:
            raise ConfigError(f"{where}.listen: {cfg.listen} is frontend {listens[key]!r}'s too")
        listens[key] = name
        frontends.append((name, cfg))
    metrics = None
    if "metrics" in glob:
        if not isinstance(glob["metrics"], str):
            raise ConfigError(f"{path}: [global].metrics: expected \"HOST:PORT\"")
        metrics = parse_endpoint(glob["metrics"], f"{path}: [global].metrics", allow_port_zero=True)
    workers = None
    if "workers" in glob:
        workers = _convert(every["workers"], glob["workers"], f"{path}: [global].workers")
    cpu_affinity = glob.get("cpu_affinity", False)
    if not isinstance(cpu_affinity, bool):
        raise ConfigError(f"{path}: [global].cpu_affinity: expected true or false")
    return FileConfig(path, log_format, verbose, frontends, metrics, workers, cpu_affinity)


def summary(fc: FileConfig) -> str:
    """--check-config's answer: what would run."""
    lines = [f"{fc.path}: valid, {len(fc.frontends)} frontend(s)"
             + (f", metrics at http://{fc.metrics}/metrics" if fc.metrics else "")]
    for name, cfg in fc.frontends:
        ups = ",".join(str(u) + (f"(weight {u.weight})" if u.weight != 1 else "") for u in cfg.upstreams)
        lines.append(f"  {name}: {cfg.listen} -> {ups} mode={cfg.mode} backend={cfg.backend} "
                     f"balance={cfg.balance}")
    return "\n".join(lines)

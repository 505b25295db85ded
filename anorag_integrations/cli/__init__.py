"""The ``anorag-llm`` console script: healthcheck, bench, servers, setup, demo, metrics; ``--version``.

Every failure is one line that says what to do; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .manage import EMBED_PORT
from .presets import PRESET_NAMES, PresetError
from .servers import DEFAULT_PORTS, ServerStartError, interrupted_by_termination

if TYPE_CHECKING:
    from ..config import Config
    from ..router import Router

PRESET_FLAGS: dict[str, type] = {
    "--model": str,
    "--served-model-name": str,
    "--dtype": str,
    "--max-model-len": int,
    "--gpu-memory-utilization": float,
    "--tensor-parallel-size": int,
    "--port": int,
}
"""Command-line overrides of a vLLM preset's fields."""
DISTRIBUTION = "anorag-integrations"
"""The installed package whose version ``--version`` prints."""


def installed_version() -> str:
    """The version pip installed (``importlib.metadata``), so a wheel and an editable install both answer."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``: print the installed version and exit; looked up only when asked, not on every start."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"{parser.prog} {installed_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def _global_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options every command takes (``--config``, ``--debug``) to ``parser``."""
    parser.add_argument("--config", help="config file (default: $ANORAG_CONFIG or ./config.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = _global_options(
        argparse.ArgumentParser(prog="anorag-llm", description="Route LLM calls over a fleet of vLLM servers.")
    )
    parser.add_argument("--version", action=_VersionAction, help="print the installed version and exit")
    # The same options after a (sub)command: without a default there, so one given before it survives.
    common = [_global_options(argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS))]
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "demo",
        parents=common,
        help="start two local vLLM servers, route requests over them, kill one, show tables "
        "(./config.yaml when there is one, else two servers on ports 8201 and 8202)",
    )
    setup = sub.add_parser(
        "setup",
        parents=common,
        help="install real vLLM on CPU in a virtualenv of its own and prepare its model (what demo and "
        "`servers start cpu` need); does nothing when done already",
    )
    setup.add_argument("--python", help="the Python that makes the virtualenv (default: this one; 3.11 to 3.14)")

    health = sub.add_parser("healthcheck", parents=common, help="probe every route; exit 0 only when all are healthy")
    health.add_argument("--json", action="store_true", help="print JSON instead of text")
    health.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS until Ctrl-C")
    health.add_argument("--count", type=int, help="with --watch: stop after COUNT checks")

    metrics = sub.add_parser(
        "metrics", parents=common, help="serve the routes' Prometheus metrics (probing them) until Ctrl-C"
    )
    metrics.add_argument("--port", type=int, default=9464, help="port of /metrics (default 9464; 0: any free one)")
    metrics.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    metrics.add_argument(
        "--probe-interval", type=float, default=5.0, help="seconds between probes when the config sets none"
    )

    bench = sub.add_parser("bench", parents=common, help="load test through the router (all routes) or one --base-url")
    bench.add_argument("--base-url", help="one server instead of the config's routes (env VLLM_BASE)")
    bench.add_argument("--model", help="model name (env VLLM_MODEL); required with --base-url")
    bench.add_argument("--concurrency", type=int, help="parallel requests (env CONC, default 8)")
    bench.add_argument("--requests", type=int, help="total requests (env NREQ, default 64)")
    bench.add_argument("--max-tokens", type=int, help="tokens per answer (default 32)")
    bench.add_argument("--stream", action="store_true", help="stream, and report time to first token and tokens/s")
    bench.add_argument("--prompt", help="the prompt every request sends")
    bench.add_argument("--sweep", help="progressive test over concurrencies, e.g. 1,2,4,8,16,32,64")
    bench.add_argument("--out", help="write the JSON report here")
    bench.add_argument("--plot", help="with --sweep: write throughput and p95 against concurrency here (PNG)")

    servers = sub.add_parser("servers", parents=common, help="start, stop, inspect local inference servers")
    actions = servers.add_subparsers(dest="action", required=True)
    start = actions.add_parser(
        "start", parents=common, help=f"start a preset in the background: {', '.join(PRESET_NAMES)}"
    )
    start.add_argument("preset", choices=PRESET_NAMES)
    start.add_argument(
        "--ports", help=f"cpu, llamacpp: comma-separated ports (default {','.join(map(str, DEFAULT_PORTS))})"
    )
    start.add_argument("--alias", help="cpu, llamacpp: served model name (default smollm2 / gemma3_270m)")
    start.add_argument(
        "--embeddings",
        nargs="?",
        type=int,
        const=EMBED_PORT,
        metavar="PORT",
        help=f"cpu: also a vLLM embeddings server on all-MiniLM-L6-v2 (port {EMBED_PORT} unless given)",
    )
    start.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C or SIGTERM stops them")
    for flag, kind in PRESET_FLAGS.items():
        start.add_argument(flag, type=kind, help="vLLM presets: override the preset's value")
    for action in ("stop", "status"):
        cmd = actions.add_parser(action, parents=common, help=f"{action} servers started from here (all when no NAME)")
        cmd.add_argument("target", nargs="?", metavar="NAME|PRESET")
        if action == "status":
            cmd.add_argument("--json", action="store_true")
    logs = actions.add_parser("logs", parents=common, help="show the end of a server's log")
    logs.add_argument("target", metavar="NAME|PRESET")
    logs.add_argument("-n", "--lines", type=int, default=40)
    return parser


def run() -> None:
    """The console script: :func:`main`, then exit without the interpreter's final sweeps of the whole heap.

    Once a command has released what it holds, the only work left is the garbage collections Python runs
    while finalising, over every object of every imported module (openai's and pydantic's types among
    them): 0.25-1 s on a quiet machine, seconds on a busy one, between a Ctrl-C and the exit. Frozen
    objects are skipped, so the process ends in milliseconds.
    """
    try:
        sys.exit(main())
    finally:  # also when a SIGTERM's SystemExit ends a command
        gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    from ..router import RouterError

    args = _parser().parse_args(argv)
    try:
        with interrupted_by_termination():
            return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (RouterError, ServerStartError, PresetError, ValueError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc).strip()
        print(f"anorag-llm {args.command}: {message}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.config)
    if args.command == "setup":
        from .setup import setup

        setup(python=args.python)
        return 0
    if args.command == "healthcheck":
        return _healthcheck(args.config, as_json=args.json, watch=args.watch, count=args.count)
    if args.command == "bench":
        return _bench(args)
    if args.command == "metrics":
        return _metrics(args)
    return _servers(args)


def _healthcheck(config_path: str | None, *, as_json: bool, watch: float | None, count: int | None) -> int:
    from ..router import Router

    checks = 0
    with Router.from_config(config_path, start_prober=False) as router:
        if watch:
            reload_on_sighup(router)
        while True:
            rows = router.health()
            healthy = sum(1 for row in rows.values() if row["healthy"])
            if as_json:
                print(json.dumps({"routes": rows, "healthy": healthy, "total": len(rows)}, indent=2), flush=True)
            else:
                if watch:
                    print(time.strftime("%Y-%m-%d %H:%M:%S"))
                print(_health_text(router, rows, healthy), flush=True)
            checks += 1
            if not watch or (count is not None and checks >= count):
                return 0 if healthy == len(rows) else 1
            time.sleep(watch)


def _health_text(router: Any, rows: dict[str, dict[str, Any]], healthy: int) -> str:
    config = router.config
    lines = [
        f"config:        {config.source}",
        f"default route: {config.default_route_name}",
        f"fallback:      {config.fallback_route or '-'}",
        f"lb_policy:     {config.lb_policy}",
        f"total routes:  {len(rows)}",
        "",
    ]
    for name, row in rows.items():
        latency = f"{row['latency_ms']:.1f} ms" if row["latency_ms"] is not None else "-"
        lines += [
            f"[{'OK' if row['healthy'] else 'DOWN'}] {name}",
            f"    url:     {row['url']}",
            f"    kind:    {row['kind']}   model: {row['model']}"
            + (f"   aliases: {', '.join(row['aliases'])}" if row["aliases"] else ""),
            f"    serves:  {_served_text(row)}"
            + (f" (max_model_len {row['max_model_len']})" if row["max_model_len"] else ""),
            f"    latency: {latency}   breaker: {row['state']}",
        ]
        if not row["healthy"] and row["error"]:
            lines.append(f"    error:   {row['error']}")
    lines.append(f"\n{healthy}/{len(rows)} routes healthy")
    return "\n".join(lines)


def _served_text(row: dict[str, Any]) -> str:
    """The names a route serves now, each adapter with its base model, and those its server answered 404 for."""
    adapters = row["adapters"]
    names = [f"{name} (LoRA of {adapters[name]})" if name in adapters else name for name in row["serves"]]
    text = ", ".join(names) or "-"
    return text + (f"; 404 for: {', '.join(row['dropped'])}" if row["dropped"] else "")


def _metrics(args: argparse.Namespace) -> int:
    """Serve the config's router metrics at /metrics with the prober running, until Ctrl-C or SIGTERM."""
    from ..config import load_config
    from ..router import Router

    if args.probe_interval <= 0:
        raise ValueError(f"--probe-interval must be a positive number of seconds, got {args.probe_interval}")

    def probing(config: Config) -> Config:
        if config.health.probe_interval > 0:
            return config
        health = config.health.model_copy(update={"probe_interval": args.probe_interval})
        return config.model_copy(update={"health": health})  # the metrics would never show a dead route otherwise

    with Router(probing(load_config(args.config))) as router:
        reload_on_sighup(router, probing)
        port = router.serve_metrics(args.port, args.host)
        _wait_for_stop(f"serving metrics of {len(router.routes)} routes at http://{args.host}:{port}/metrics",
                       "Ctrl-C stops.")  # fmt: skip
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, run, summary_line

    sweep = [int(part) for part in args.sweep.split(",") if part.strip()] if args.sweep else []
    if args.plot and not sweep:
        raise ValueError("--plot needs --sweep (it plots against concurrency)")
    options = BenchOptions.from_env(
        base_url=args.base_url,
        model=args.model,
        concurrency=args.concurrency,
        requests=args.requests,
        max_tokens=args.max_tokens,
        stream=args.stream or None,
        prompt=args.prompt,
        config_path=args.config,
        sweep=sweep or None,
    )
    report = run(options, out=args.out, plot=args.plot)
    print(summary_line(report))
    if args.out:
        print(f"report: {args.out}")
    if args.plot:
        print(f"plot: {args.plot}")
    runs = report.get("runs") or [report]
    return 0 if all(r["summary"]["failed_requests"] == 0 for r in runs) else 1


def _servers(args: argparse.Namespace) -> int:
    from . import manage
    from .tables import table

    if args.action == "start":
        ports = _ports(args.ports) if args.ports is not None else None
        overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in PRESET_FLAGS}
        started = manage.start(args.preset, ports=ports, alias=args.alias, embed_port=args.embeddings, **overrides)
        for record in started:
            print(f"started {record.name}: {record.url} (pid {record.pid}, log {record.log})", flush=True)
        if args.foreground:
            _wait_then_stop([record.name for record in started])
        return 0
    if args.action == "stop":
        for record, outcome in manage.stop(args.target):
            print(f"{record.name}: {outcome}")
        return 0
    if args.action == "status":
        rows = manage.status(args.target)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(
                table(rows, ("preset", "url", "pid", "running", "healthy"), key="server")
                if rows
                else "no servers started from here"
            )
        return 0 if all(row["healthy"] for row in rows.values()) else 1
    print(manage.logs(args.target, args.lines))
    return 0


def _ports(text: str) -> list[int]:
    """``--ports 8201,8202`` as numbers; ValueError naming the option otherwise."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise ValueError(f"--ports wants comma-separated port numbers, e.g. 8201,8202 (got {text!r})")
    return [int(part) for part in parts]


def reload_on_sighup(router: Router, prepare: Callable[[Config], Config] = lambda config: config) -> None:
    """``kill -HUP``: the router reloads its config file (``Router.reload``) in a thread, and says what changed; a
    config that does not load is refused and the running one keeps serving."""
    from ..config import load_config

    def reload() -> None:
        try:
            changes = router.reload(prepare(load_config(router.config.source)))
        except Exception as exc:  # a bad file, a closed router: said, never the end of the command
            print(f"reload refused; the running config keeps serving: {str(exc).strip()}", file=sys.stderr, flush=True)
            return
        print(f"reloaded {router.config.source}: {changes.summary()}", flush=True)

    def hangup(*_: object) -> None:
        threading.Thread(target=reload, name="anorag-reload", daemon=True).start()

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, hangup)


def _wait_for_stop(*ready: str) -> None:
    """Print ``ready``, then block until Ctrl-C (exit status 130) or SIGTERM (a requested stop: status 0),
    unwinding the caller's cleanup. The SIGTERM handler is in place before anything says "ready": a stop
    sent on reading that line is a requested stop, never taken for a Ctrl-C."""

    def terminate(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    for line in ready:
        print(line, flush=True)
    threading.Event().wait()


def _wait_then_stop(names: list[str]) -> None:
    from . import manage

    try:
        _wait_for_stop("Ctrl-C stops them.")
    finally:
        for name in names:
            with contextlib.suppress(ValueError):  # already stopped from another shell
                manage.stop(name)

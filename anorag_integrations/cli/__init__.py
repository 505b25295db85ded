"""The ``anorag-llm`` console script: demo, healthcheck, local servers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..router import RouterError
from .servers import DEFAULT_ALIAS, DEFAULT_PORTS, LlamaServer, ServerStartError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anorag-llm", description="Route LLM calls over a fleet of vLLM servers.")
    parser.add_argument("--config", help="config file (default: $ANORAG_CONFIG or ./config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="start two local llama.cpp servers, route requests over them, show tables")
    health = sub.add_parser("healthcheck", help="probe every route; exit 0 only when all are healthy")
    health.add_argument("--json", action="store_true", help="print JSON instead of a table")
    servers = sub.add_parser("servers", help="run local llama.cpp servers in the foreground until Ctrl-C")
    servers.add_argument("--ports", default=",".join(map(str, DEFAULT_PORTS)), help="comma-separated ports")
    servers.add_argument("--alias", default=DEFAULT_ALIAS, help="served model name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.config)
        if args.command == "healthcheck":
            return _healthcheck(args.config, as_json=args.json)
        return _servers([int(p) for p in args.ports.split(",") if p], args.alias)
    except (RouterError, ServerStartError) as exc:
        print(f"anorag-llm {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _healthcheck(config_path: str | None, *, as_json: bool) -> int:
    from ..router import Router
    from .tables import HEALTH_COLUMNS, table

    with Router.from_config(config_path, start_prober=False) as router:
        rows = router.health()
        healthy = sum(1 for row in rows.values() if row["healthy"])
        if as_json:
            print(json.dumps({"routes": rows, "healthy": healthy, "total": len(rows)}, indent=2))
        else:
            print(f"config: {router.config.source}")
            print(f"default route: {router.config.default_route_name}; lb_policy: {router.config.lb_policy}\n")
            print(table(rows, (*HEALTH_COLUMNS, "error")))
            print(f"\n{healthy}/{len(rows)} routes healthy")
    return 0 if healthy == len(rows) else 1


def _servers(ports: list[int], alias: str) -> int:
    import signal
    import threading

    def terminate(*_: object) -> None:
        raise SystemExit(0)  # unwinds to the finally below, which stops the child servers

    signal.signal(signal.SIGTERM, terminate)
    servers = [LlamaServer(port, alias=alias) for port in ports]
    try:
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_ready()
            print(f"{server.base_url} ready (model {alias!r}, log {server.log_path})", flush=True)
        print("Ctrl-C stops them.", flush=True)
        threading.Event().wait()
    finally:
        for server in servers:
            server.stop()
    return 0

"""``python -m anorag_integrations.testing``: run a FaultServer in its own process (for benchmarks).

Prints ``READY <base_url>`` once listening and serves until killed. ``--fault`` switches a fault on
for the server's life, e.g. ``--fault delay --every 25 --option delay=1.0`` (a stall on every 25th
request) or ``--fault cut --every 4 --option after_chunks=3``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from .fault_server import Fault, FaultServer


def _option(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER, got {text!r}")
    return key, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description="vLLM-shaped fault-injection server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--reply", default="one two three four five six seven eight")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer (a slow server)")
    parser.add_argument("--max-running", type=int, help="requests served at once; more wait (vLLM's queue)")
    parser.add_argument("--fault", choices=[f.value for f in Fault], help="a fault for the server's life")
    parser.add_argument("--every", type=int, default=1, help="the fault hits every Nth request only")
    parser.add_argument("--option", type=_option, action="append", default=[], help="fault option KEY=NUMBER")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = FaultServer(args.model, reply=args.reply, port=args.port, max_running=args.max_running)
    server.latency = args.delay
    with server:
        if args.fault:
            server.set_fault(args.fault, every=args.every, **dict(args.option))
        print(f"READY {server.base_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()

"""``python -m anorag_integrations.testing``: run a FaultServer in its own process (for benchmarks).

Prints ``READY <base_url>`` once listening and serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from .fault_server import Fault, FaultServer


def main() -> None:
    parser = argparse.ArgumentParser(description="vLLM-shaped fault-injection server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--reply", default="one two three four five six seven eight")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer (a slow server)")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FaultServer(args.model, reply=args.reply, port=args.port) as server:
        if args.delay:
            server.set_fault(Fault.DELAY, delay=args.delay)
        print(f"READY {server.base_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()

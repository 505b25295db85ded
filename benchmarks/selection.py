"""Route selection cost: microseconds per pick with 10, 100 and 1,000 routes, per policy.

LiteLLM's router selection grows quadratically (about 51 ms at 1,000 deployments in its tracker);
the target here is < 20 us per pick at 1,000 routes. Run: ``.venv/bin/python benchmarks/selection.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import save

from anorag_integrations import Router
from anorag_integrations.config import config_from_dict
from anorag_integrations.router.call import Call as _Call
from anorag_integrations.router.rounds import claim

POLICIES = ("round_robin", "least_latency", "least_outstanding")


def per_pick_us(n_routes: int, policy: str, picks: int) -> float:
    routes = {
        f"r{i}": {"base_url": f"http://127.0.0.1:{20000 + i}/v1", "model": "m"} for i in range(n_routes)
    }  # never called
    router = Router(config_from_dict({"llm": {"routes": routes, "lb_policy": policy}}, env={}), start_prober=False)
    call = _Call(router, [{"role": "user", "content": "x"}], {}, stream=False)
    for route in list(router.routes.values())[::3]:  # some load, so least_* policies have work to do
        route.stats.started()
        route.stats.succeeded(0.05)
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(picks):
            lease = claim(router, call, set())  # the pick, and claiming the route (breaker, in-flight)
            assert lease is not None
            lease.abandoned()
        rounds.append((time.perf_counter() - started) / picks * 1e6)
    router.close()
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--picks", type=int, default=20_000)
    args = parser.parse_args()
    results = []
    for n in (10, 100, 1000):
        for policy in POLICIES:
            us = per_pick_us(n, policy, args.picks)
            results.append({"routes": n, "policy": policy, "us_per_pick": round(us, 2), "target_us": 20})
            print(f"{n:5} routes  {policy:18} {us:7.2f} us/pick")
    print("written to", save("selection", results, picks=args.picks))


if __name__ == "__main__":
    main()

"""Route selection cost: microseconds per pick with 10, 100 and 1,000 routes, per policy, and with the 1,000
routes spread over 50 models (each call naming one: the pick is made within that model's group).

LiteLLM's router selection grows quadratically (about 51 ms at 1,000 deployments in its tracker);
the target here is < 20 us per pick at 1,000 routes, and a pick among 50 models within 1.5x of a pick
with one model, measured in the same run. Run: ``.venv/bin/python benchmarks/selection.py``.
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


MODELS = 50
"""Models the 1,000 routes serve in the many-models case (20 routes each)."""


def per_pick_us(n_routes: int, policy: str, picks: int, models: int = 1) -> float:
    routes = {
        f"r{i}": {"base_url": f"http://127.0.0.1:{20000 + i}/v1", "model": f"m{i % models}"} for i in range(n_routes)
    }  # never called
    router = Router(config_from_dict({"llm": {"routes": routes, "lb_policy": policy}}, env={}), start_prober=False)
    message = [{"role": "user", "content": "x"}]
    calls = [_Call(router, message, {"model": f"m{k}"} if models > 1 else {}, stream=False) for k in range(models)]
    for route in list(router.routes.values())[::3]:  # some load, so least_* policies have work to do
        route.stats.started()
        route.stats.succeeded(0.05)
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(picks):
            lease = claim(router, calls[i % models], set(), set())  # the pick, and claiming the route (breaker, slot)
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
    for policy in POLICIES:
        one = next(r["us_per_pick"] for r in results if r["routes"] == 1000 and r["policy"] == policy)
        us = per_pick_us(1000, policy, args.picks, models=MODELS)
        ratio = us / one
        results.append(
            {
                "routes": 1000,
                "models": MODELS,
                "policy": policy,
                "us_per_pick": round(us, 2),
                "vs_one_model": round(ratio, 2),
            }
        )
        print(f" 1000 routes, {MODELS} models  {policy:18} {us:7.2f} us/pick  {ratio:.2f}x one model (target <= 1.5x)")
    print("written to", save("selection", results, picks=args.picks))


if __name__ == "__main__":
    main()

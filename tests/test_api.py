"""The Python API's habits: batches of prompts, SamplingParams objects, explicit typed keyword arguments, one set
of sampling defaults (the checkpoint's when it ships some), decode(skip_special_tokens=)."""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import gemmakit
from gemmakit import LLM, SamplingParams
from gemmakit.errors import InvalidParameterError
from gemmakit.sampling import checkpoint_defaults
from helpers import write_tiny_gguf

PROMPTS = ["The capital of France is", "Hello, my name is", "1, 2, 3,"]
README = Path(__file__).parent.parent / "README.md"


def test_generate_takes_a_list_of_prompts_as_one_batch(llm) -> None:
    ids = llm.tokenizer.encode("Once upon a time", add_bos=True)
    out = llm.generate([*PROMPTS, ids], max_tokens=8, temperature=0)
    assert isinstance(out, list) and len(out) == 4
    # Each prompt alone through the engine gives the same tokens (batch invariance) ...
    assert [c.token_ids for c in out] == [llm.generate([p], max_tokens=8, temperature=0)[0].token_ids
                                          for p in [*PROMPTS, ids]]
    # ... and the single-sequence path agrees with the batch.
    assert [c.text for c in out[:2]] == [llm.generate(p, max_tokens=8, temperature=0).text for p in PROMPTS[:2]]
    assert all(c.finish_reason == "length" and c.usage.completion_tokens == 8 for c in out)
    assert out[3].usage.prompt_tokens == len(ids)


def test_a_batch_larger_than_the_cache_rows_waits_its_turn(llm, monkeypatch) -> None:
    import gemmakit.llm as llm_module

    monkeypatch.setattr(llm_module, "BATCH_KV_BYTES", 1)  # room for one row only: prompts run one at a time
    out = llm.generate(PROMPTS, max_tokens=4, temperature=0)
    monkeypatch.undo()
    assert [c.token_ids for c in out] == [c.token_ids for c in llm.generate(PROMPTS, max_tokens=4, temperature=0)]


@pytest.mark.parametrize("bad", [["a", 5], ["a", [2, -1]], [["x"]], 3.5])
def test_bad_prompts_in_a_batch_are_named(llm, bad) -> None:
    with pytest.raises(InvalidParameterError, match="prompt"):
        llm.generate(bad, max_tokens=2)


def test_sampling_params_object_and_overrides(llm) -> None:
    params = SamplingParams(max_tokens=6, temperature=0)
    a = llm.generate("Hello", params)
    assert a.usage.completion_tokens == 6 and a.token_ids == llm.generate("Hello", max_tokens=6, temperature=0).token_ids
    b = llm.generate("Hello", params, max_tokens=2)  # a keyword changes one setting of the object
    assert b.token_ids == a.token_ids[:2] and params.max_tokens == 6  # the object itself is left alone
    assert [e.token_id for e in llm.stream("Hello", params)][:6] == a.token_ids
    chat = llm.chat([{"role": "user", "content": "Hi"}], params)
    assert chat.usage.completion_tokens <= 6
    with pytest.raises(InvalidParameterError, match="SamplingParams"):
        llm.generate("Hello", {"temperature": 0})
    with pytest.raises(InvalidParameterError, match="top_p"):
        llm.generate("Hello", params, top_p=3)
    assert gemmakit.SamplingParams is SamplingParams


@pytest.mark.parametrize("method", ["generate", "stream", "chat", "chat_stream"])
def test_public_signatures_spell_out_every_sampling_argument(method) -> None:
    signature = inspect.signature(getattr(LLM, method))
    kinds = {p.kind for p in signature.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
    for f in fields(SamplingParams):
        parameter = signature.parameters[f.name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.annotation != inspect.Parameter.empty
        assert repr(parameter.default) == "<model default>"
    assert signature.parameters["params"].annotation == "SamplingParams | None"
    assert getattr(LLM, method).__doc__
    assert (Path(gemmakit.__file__).parent / "py.typed").is_file()


def test_decode_skip_special_tokens(llm) -> None:
    ids = llm.tokenizer.encode("Hello", add_bos=True)
    assert llm.tokenizer.decode(ids) == "<bos>Hello"
    assert llm.tokenizer.decode(ids, skip_special_tokens=True) == "Hello"


def _readme_defaults() -> dict[str, str]:
    """The rows of the README's sampling-defaults table: parameter -> default, as written."""
    text = README.read_text()
    table = text[text.index("<!-- sampling-defaults -->"):text.index("<!-- /sampling-defaults -->")]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `([^`]*)` \|", table, re.M)}


def test_defaults_table_matches_the_code() -> None:
    rows = _readme_defaults()
    code = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(SamplingParams)}
    assert set(rows) == set(code)
    for name, written in rows.items():
        assert written == repr(code[name]), f"README says {name} = {written}, the code {code[name]!r}"


def test_gguf_sampling_defaults_become_the_models_everywhere(tmp_path) -> None:
    """A checkpoint's recommended settings replace gemmakit's: API, CLI and server alike (temp 0: greedy)."""
    import subprocess
    import sys

    import httpx

    from gemmakit.server import create_app
    from serving import Server

    meta = {"general.sampling.temp": 0.0, "general.sampling.top_k": 20, "general.sampling.top_p": 7.0}
    path = write_tiny_gguf(tmp_path / "tiny.gguf", metadata=meta)
    tiny = gemmakit.load(path)
    assert tiny.sampling_defaults.temperature == 0 and tiny.sampling_defaults.top_k == 20
    assert tiny.sampling_defaults.top_p == SamplingParams.top_p  # 7.0 is out of range: ignored, not fatal
    reference = tiny.generate("hello", max_tokens=6, temperature=0, ignore_eos=True)
    greedy = reference.token_ids
    assert [tiny.generate("hello", max_tokens=6, ignore_eos=True, seed=s).token_ids for s in (1, 2)] == [greedy] * 2
    cli = subprocess.run([sys.executable, "-m", "gemmakit", "run", "hello", "-m", str(path), "-n", "6",
                          "--ignore-eos", "--json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert __import__("json").loads(cli.stdout)["token_ids"] == greedy
    with Server(create_app(tiny)) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 6, "ignore_eos": True,
                                                        "seed": 5}, timeout=60)
        assert r.json()["choices"][0]["text"] == reference.text


def test_generation_config_defaults() -> None:
    assert checkpoint_defaults(generation_config={"do_sample": True, "top_k": 64, "top_p": 0.95}) == {
        "top_k": 64, "top_p": 0.95}
    assert checkpoint_defaults(generation_config={"do_sample": False, "temperature": 0.7}) == {"temperature": 0.0}
    assert checkpoint_defaults(generation_config={"top_k": "many", "repetition_penalty": 1.1}) == {
        "repetition_penalty": 1.1}


def test_bundled_model_from_package_chunks_equals_the_joined_file(llm, model_path) -> None:
    """load() with no path maps the package's four chunks as one file: the same model as the joined GGUF."""
    import torch

    bundled = gemmakit.load()
    assert not bundled.path.exists() and bundled.path.name == model_path.name
    ids = llm.tokenizer.encode("The capital of France is", add_bos=True)
    assert torch.equal(bundled.logits(ids), llm.logits(ids))

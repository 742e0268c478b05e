"""The HTTP API on a real uvicorn server on loopback, driven by the official openai client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from gemmakit.server import create_app
from serving import Server, free_port, wait_until_up

MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm, model_name=MODEL)
    with Server(app) as s:
        s.app_engine = app.state.engine
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "user", "content": "Name a color."}]


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "auth": False,
                                                        "kernels": {"available": True, "reason": None}}


def test_chat_completion_matches_api(llm, client) -> None:
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    ref = llm.chat(CHAT, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason == "length"
    assert out.usage.prompt_tokens == ref.usage.prompt_tokens and out.usage.completion_tokens == 8


def test_streamed_chat_reassembles_to_non_streamed(client) -> None:
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_completion_and_echo(llm, client) -> None:
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert out.choices[0].text == llm.generate(prompt, max_tokens=6, temperature=0).text
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + out.choices[0].text
    ids = llm.tokenizer.encode(prompt, add_bos=True)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text


def test_n_seed_logprobs_and_stop(client) -> None:
    two = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, seed=5, temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, seed=5, temperature=1.0)
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]
    lp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                        top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy picks the top one
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0]
    stop = full.text.strip().split(" ")[1]
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full.text[: full.text.index(stop)]


def test_batch_of_prompts(llm, client) -> None:
    """A list of prompts: each prompt's n choices in turn, as OpenAI orders them; usage sums the prompts."""
    prompts = ["The capital of France is", "Once upon a time"]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0)
    alone = [llm.generate(p, max_tokens=5, temperature=0).text for p in prompts]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert out.usage.prompt_tokens == sum(len(llm.tokenizer.encode(p, add_bos=True)) for p in prompts)
    assert out.usage.completion_tokens == 20
    by_ids = client.completions.create(model=MODEL, prompt=[llm.tokenizer.encode(p, add_bos=True) for p in prompts],
                                       max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == alone
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.completions.create(model=MODEL, prompt=["a"] * 5, n=16, max_tokens=1)


# The engine scores a prompt as one-token rows through the integer decode kernel, which rounds each matmul input to
# 16 bits per group (README: decode logits within ~1e-2 of float32). Measured against the float32 reference: at
# most 1.4e-3 on this 6-token prompt and 8.7e-4 over a 155-token one (Intel Xeon AVX-512); llm.logits on a short
# prompt takes the same kernel with PyTorch attention and lands up to 2.4e-3 from the engine on that CPU. The bound
# asserted is the kernel's documented one, against float32 weights and PyTorch matmuls on every CPU.
ECHO_LOGPROB_BOUND = 1e-2


def test_echo_with_logprobs_scores_the_prompt(llm, fp32_llm, client) -> None:
    """OpenAI's echo + logprobs: every prompt token's log-probability given the ones before (the first: None),
    then the completion's; streamed or not, the same numbers."""
    prompt = "The capital of France is"
    ids = llm.tokenizer.encode(prompt, add_bos=True)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    n = len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = torch.log_softmax(fp32_llm.logits(ids), dim=-1)
    for k in range(1, n):
        assert lp.token_logprobs[k] == pytest.approx(float(reference[k - 1, ids[k]]), abs=ECHO_LOGPROB_BOUND)
        assert len(lp.top_logprobs[k]) == 2
    text = out.choices[0].text
    assert text.startswith(prompt) and "".join(lp.tokens[1:n]) == prompt  # the BOS is not in the text
    assert all(text[lp.text_offset[k]:].startswith(lp.tokens[k]) for k in range(1, n + 3))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text


def test_logit_bias(llm, client) -> None:
    token = llm.tokenizer.encode(" Paris")[0]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                    logit_bias={str(token): 100})
    assert out.choices[0].text == llm.tokenizer.decode([token] * 3)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logit_bias={"999999999": 5})


def test_tokenize_detokenize(llm, server) -> None:
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == llm.tokenizer.encode("Hello world", add_bos=True)
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"][1:]}).json()
    assert back["prompt"] == "Hello world"


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({"model": MODEL, "messages": CHAT, "max_tokens": 10**9}, 400, "tokens"),
        ({"model": MODEL, "messages": CHAT, "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "messages": CHAT, "top_p": "high"}, 400, "top_p"),
        ({"model": MODEL, "messages": CHAT, "seed": 2**70}, 400, "seed"),
        ({"model": MODEL, "messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
        ({"model": MODEL, "messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "bogus"}}}}, 400, "invalid json schema"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, 400, "out of order"),
    ],
)
def test_errors_are_openai_shaped(server, body, status, fragment) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert fragment in error["message"] and "Traceback" not in r.text


@pytest.mark.parametrize("method,path,status", [("POST", "/v1/embeddings", 404), ("GET", "/v1/completions", 405)])
def test_unknown_routes_are_openai_shaped(server, method, path, status) -> None:
    r = httpx.request(method, server.url + path)
    assert r.status_code == status and path in r.json()["error"]["message"]


def test_malformed_json(server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in r.json()["error"]["message"]


def test_context_overflow_says_what_fits(server) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 10**7})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "new tokens fit" in error["message"]


def test_any_model_name_is_served_unless_strict(llm, client) -> None:
    """Clients configured with another model name (most OpenAI code hard-codes one) get an answer, as from Ollama
    and llama-server; --strict-model-name brings back the 404."""
    out = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2, temperature=0)
    assert out.model == MODEL and out.choices[0].message.content is not None
    with Server(create_app(llm, model_name=MODEL, strict_model_name=True)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT, "max_tokens": 2})
        assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_not_found"
        ok = httpx.post(s.url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
        assert ok.status_code == 200


def test_auth(llm) -> None:
    with Server(create_app(llm, model_name=MODEL, api_keys=["s3cret"])) as s:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        assert httpx.get(s.url + "/health").status_code == 200  # health stays open


def test_cancelled_stream_frees_the_slot(server, client) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"model": MODEL, "messages": CHAT, "max_tokens": 200, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and "content" in line:
                break  # hang up mid-stream
    # The next request is served (the abandoned generation released the slot).
    start = time.time()
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason == "length" and time.time() - start < 60


def test_sixteen_concurrent_streams(llm, server) -> None:
    """All complete, each with the text it would get alone (8 batched at a time, the rest queued)."""
    import concurrent.futures

    prompts = [f"Count from {i}:" for i in range(16)]

    def run(prompt: str) -> str:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        stream = c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in stream if ch.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(run, prompts))
    assert texts == [llm.generate(p, max_tokens=4, temperature=0).text for p in prompts]


def test_serve_command(tmp_path) -> None:
    import subprocess
    import sys

    port = free_port()
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "serve", "--port", str(port),
                             "--api-keys-file", str(keys), "--model-name", MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        assert c.models.list().data[0].id == MODEL
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "k1" not in err  # keys are never logged


def test_metrics(server, client) -> None:
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
    list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, stream=True))
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["gemmakit_generated_tokens_total"] >= 6
    assert values["gemmakit_prompt_tokens_total"] > 0
    assert values["gemmakit_time_to_first_token_seconds_count"] >= 2
    assert values["gemmakit_inter_token_latency_seconds_count"] >= 2
    assert values["gemmakit_queue_depth"] == 0 and values["gemmakit_running_sequences"] == 0
    assert any(k.startswith('gemmakit_requests_total{path="/v1/chat/completions",status="200"}') for k in values)


def test_openapi_describes_the_api(server) -> None:
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
            "/metrics"} <= set(paths)


def test_full_queue_gets_429(llm) -> None:
    import concurrent.futures

    with Server(create_app(llm, model_name=MODEL, max_batch=1, max_waiting=1)) as s:
        def run(i: int) -> int:
            return httpx.post(s.url + "/v1/completions", timeout=120,
                              json={"model": MODEL, "prompt": f"{i}", "max_tokens": 24}).status_code

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(run, range(6)))
        assert 429 in codes and 200 in codes
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200


def test_kv_budget_bounds_the_rows_and_says_so(llm, caplog) -> None:
    from gemmakit.engine.engine import PREFILL_CHUNK
    from gemmakit.kv_cache import KVCache

    row = KVCache.row_bytes(llm.config, 512, llm.model.activation_dtype, ring_extra=PREFILL_CHUNK)
    with caplog.at_level("WARNING", logger="gemmakit.server"):
        app = create_app(llm, model_name=MODEL, max_batch=8, context_length=512, kv_cache_bytes=3 * row)
    try:
        assert app.state.engine.max_batch == 3
        assert "holds 3 rows of 512 tokens" in caplog.text and "max_batch=8" in caplog.text
    finally:
        app.state.engine.shutdown()


def test_batch_invariance(server) -> None:
    """8 different greedy requests sent together get the same tokens as each sent alone."""
    import concurrent.futures

    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
               "Water boils at", "In 1492,", "The best way to learn a language", "My favorite food is"]

    def run(prompt: str) -> list[int]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["logprobs"]["tokens"], choice["text"]

    alone = [run(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone
    assert server.app_engine.peak_batch >= 4  # they really shared decode steps


def test_deadline_stops_a_request(server) -> None:
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "timeout": 0.5}
    start = time.time()
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 408 and time.time() - start < 20
    assert "deadline of 0.5 s" in r.json()["error"]["message"]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert "deadline" in lines[-2] and lines[-1] == "data: [DONE]"
    # The engine is free again: nothing left running.
    assert _metric(server, "gemmakit_running_sequences") == 0


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise KeyError(name)


def test_disconnect_frees_the_row_for_the_next_request(llm) -> None:
    """One row only: a client that hangs up mid-stream must not keep it."""
    with Server(create_app(llm, model_name=MODEL, max_batch=1, max_waiting=4)) as s:
        with httpx.stream("POST", s.url + "/v1/completions",
                          json={"model": MODEL, "prompt": "Count:", "max_tokens": 1500, "ignore_eos": True,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if '"text"' in line:
                    break
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200
        assert _metric(s, "gemmakit_running_sequences") == 0
        assert 0 <= _metric(s, "gemmakit_kv_cache_usage_ratio") <= 1 and _metric(s, "gemmakit_kv_cache_rows") == 1


def test_client_hanging_up_on_a_plain_request_cancels_it(llm) -> None:
    """A non-streamed request whose client goes away stops generating and frees its row (one row here: the
    next request would otherwise wait for all 1500 tokens of the abandoned one)."""
    with Server(create_app(llm, model_name=MODEL, max_batch=1, max_waiting=4)) as s:
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 1500, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                       timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert _metric(s, "gemmakit_generated_tokens_total") < 1000
        assert _metric(s, "gemmakit_running_sequences") == 0
        assert _metric(s, 'gemmakit_requests_total{path="/v1/completions",status="499"}') == 1


def test_request_log_line(server, caplog) -> None:
    import json
    import logging

    with caplog.at_level(logging.INFO, logger="gemmakit.server"):
        httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "A secret prompt", "max_tokens": 3, "temperature": 0})
        deadline = time.time() + 5
        while not any("/v1/completions" in r.getMessage() for r in caplog.records) and time.time() < deadline:
            time.sleep(0.05)
    lines = [json.loads(r.getMessage()) for r in caplog.records if "/v1/completions" in r.getMessage()]
    line = lines[-1]
    assert line["status"] == 200 and line["prompt_tokens"] == 4 and line["completion_tokens"] == 3
    assert "secret" not in json.dumps(lines) and line["ms"] > 0 and len(line["id"]) == 12


def test_unknown_paths_do_not_grow_metrics(server) -> None:
    """Labels come from route templates: 1,000 distinct unknown paths add nothing to /metrics."""
    def series(text: str) -> list[str]:  # the time series, without their values
        return [line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")]

    with httpx.Client(base_url=server.url) as http:
        http.get("/nope-0")
        http.get("/metrics")
        before = http.get("/metrics").text
        for i in range(1000):
            assert http.get(f"/nope-{i}-" + "x" * 2000).status_code == 404
        after = http.get("/metrics").text
    assert series(after) == series(before) and abs(len(after) - len(before)) < 20  # counts grew by a few digits
    assert 'path="unmatched",status="404"' in after and "nope" not in after
    assert 'gemmakit_requests_total{path="/metrics",status="200"}' in after


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    ("/v1/completions", {"prompt": "x\udfffy", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", "\ud800"], "max_tokens": 2}, "stop.1"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
])
def test_lone_surrogates_are_a_400_and_the_connection_survives(server, path, body, field) -> None:
    with httpx.Client(base_url=server.url) as http:
        first = http.get("/health")
        r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"] and "Unicode" in r.json()["error"]["message"]
        after = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
        assert after.status_code == 200
        # the same keep-alive connection carried all three requests
        port = {resp.extensions["network_stream"].get_extra_info("client_addr")[1] for resp in (first, r, after)}
        assert len(port) == 1


@pytest.mark.parametrize("raw", [b'{"prompt": "hi", "temperature": 1e309}', b'{"prompt": "hi", "temperature": 2.5}'])
def test_temperature_in_openais_range(server, raw) -> None:
    r = httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]


def test_keys_guard_metrics_and_docs_unless_public(llm) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    with Server(create_app(llm, model_name=MODEL, api_keys=["s3cret"])) as s:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert httpx.get(s.url + path, headers=auth).status_code == 200, path
        for path in ("/health", "/", "/static/chat.js"):  # no data behind them: open
            assert httpx.get(s.url + path).status_code == 200, path
    with Server(create_app(llm, model_name=MODEL, api_keys=["s3cret"], public_docs_and_metrics=True)) as s:
        assert httpx.get(s.url + "/metrics").status_code == 200
        assert httpx.get(s.url + "/openapi.json").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401


def test_auth_comes_before_the_body_is_parsed(llm) -> None:
    with Server(create_app(llm, model_name=MODEL, api_keys=["s3cret"])) as s:
        bad = httpx.post(s.url + "/v1/chat/completions", content=b"not json",
                         headers={"content-type": "application/json"})
        assert bad.status_code == 401  # not 400: nobody without a key learns how the body was judged
        start = time.perf_counter()
        big = httpx.post(s.url + "/v1/completions", content=b'{"prompt": "' + b"a" * 20_000_000 + b'"}',
                         headers={"content-type": "application/json"}, timeout=60)
        assert big.status_code == 401 and time.perf_counter() - start < 5
        good = httpx.post(s.url + "/v1/chat/completions", content=b"not json",
                          headers={"content-type": "application/json", "Authorization": "Bearer s3cret"})
        assert good.status_code == 400


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(llm) -> None:
    """A bug in a route answers a logged 500 in OpenAI's shape; the keep-alive connection carries the next request
    (a route that fails is added to a real app for the test: no route of the server fails on purpose)."""
    app = create_app(llm, model_name=MODEL)

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    with Server(app) as s, httpx.Client(base_url=s.url) as http:
        r = http.get("/broken")
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal server error" and "bug" not in r.text
        again = http.get("/health")
        assert again.status_code == 200
        ports = {x.extensions["network_stream"].get_extra_info("client_addr")[1] for x in (r, again)}
        assert len(ports) == 1

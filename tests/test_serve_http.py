"""`kvfold serve` over HTTP: a real uvicorn server on a free localhost port, driven by the official `openai`
client (and httpx for raw status codes, headers and event streams). Tiny random Llama + byte tokenizer."""

from __future__ import annotations

import json
import logging
import random
import string
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

from kvfold.errors import KVFoldError
from kvfold.serve import BackgroundServer, ServeConfig, create_app

from .serve_helpers import byte_tokenizer, tiny_serving_model

KEY, OTHER_KEY = "test-key-0123456789", "other-key-0123456789"
MODEL = "tiny"


@contextmanager
def serving(tokenizer, **options):
    """A server with its own tiny model (seed 0: every server has the same weights)."""
    options = {"model_id": MODEL, "api_keys": (KEY,), **options}
    app = create_app(tiny_serving_model(tokenizer), tokenizer, ServeConfig(**options))
    with BackgroundServer(app) as server:
        server.engine = app.state.engine
        yield server


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, **{"timeout": 60, **kwargs})


def chat_body(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def wait_idle(server, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not server.engine.idle():
        assert time.monotonic() < deadline, "the engine did not finish"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    with serving(tokenizer, method="snapkv:0.5", queue=1, max_prompt_tokens=3000, max_body_bytes=32_768) as s:
        yield s


def test_models_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed: liveness probes
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL] and client(server).models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/metrics").status_code == 401
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'kvfold_requests_total{endpoint="/v1/models",status="200"} 1' in text
    for name in ("kvfold_generated_tokens_total", "kvfold_tokens_per_second", "kvfold_kv_bytes_prefix_cache",
                 "kvfold_kv_bytes_live", "kvfold_prefix_cache_hit_rate", "kvfold_queue_length"):
        assert f"\n{name} " in text


def test_chat_streaming_and_not_agree(server, tokenizer):
    api = client(server)
    whole = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                        max_tokens=12)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                           add_generation_prompt=True)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    extension = whole.usage.model_extra["kvfold"]
    assert extension["method"] == "snapkv:0.5" and extension["kv_bytes"] > 0 and extension["reused_tokens"] == 0
    chunks = list(api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                              max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy by default: reproducible
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and len({c.id for c in chunks}) == 1
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat_body("Hi", stream=True),
                      headers={"Authorization": f"Bearer {KEY}"}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = raw.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") and json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-2])


def test_completions_with_text_token_ids_stop_and_seed(server, tokenizer):
    api = client(server)
    first = api.completions.create(model=MODEL, prompt="The cache", max_tokens=12)
    ids = tokenizer("The cache")["input_ids"]
    assert api.completions.create(model=MODEL, prompt=ids, max_tokens=12).choices[0].text == first.choices[0].text
    text = first.choices[0].text
    stop = next(c for c in text[2:] if c != "\ufffd")
    stopped = api.completions.create(model=MODEL, prompt="The cache", max_tokens=12, stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in api.completions.create(model=MODEL, prompt="The cache",
                                                                         max_tokens=12, stop=stop, stream=True))
    assert streamed == stopped.choices[0].text
    sampled = [api.completions.create(model=MODEL, prompt="The cache", max_tokens=16, temperature=1.0, top_p=0.9,
                                      seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize("method", [None, "snapkv:0.75+kivi:4"])
def test_a_shared_2k_prefix_is_reused_and_answers_like_a_cold_request(server, tokenizer, method):
    rng = random.Random(0 if method is None else 1)
    document = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(2200))  # ~2.2k byte tokens

    def ask(target, question: str):
        extra = {"kvfold": {"method": method}} if method else {}
        reply = client(target).chat.completions.create(
            model=MODEL, max_tokens=10, extra_body=extra,
            messages=[{"role": "system", "content": document}, {"role": "user", "content": question}])
        return reply.choices[0].message.content, reply.usage.prompt_tokens, reply.usage.model_extra["kvfold"]

    _, prompt_a, cold_a = ask(server, "Which letter is most frequent?")
    text_b, prompt_b, warm_b = ask(server, "Which word comes first?")
    assert cold_a["reused_tokens"] == 0 and cold_a["prefilled_tokens"] == prompt_a > 2048
    assert warm_b["reused_tokens"] == 2048 and warm_b["prefilled_tokens"] * 5 <= cold_a["prefilled_tokens"]
    with serving(tokenizer, method="snapkv:0.5") as fresh:
        cold_text_b, cold_prompt_b, cold_b = ask(fresh, "Which word comes first?")
    assert cold_b["reused_tokens"] == 0 and cold_prompt_b == prompt_b
    assert text_b == cold_text_b and text_b  # identical greedy answer, cold or warm
    other = client(server).chat.completions.create(  # the same prefix under another method reuses nothing
        model=MODEL, max_tokens=2, extra_body={"kvfold": {"method": "streaming:0.5"}},
        messages=[{"role": "system", "content": document}, {"role": "user", "content": "Which word comes first?"}])
    assert other.usage.model_extra["kvfold"]["reused_tokens"] == 0


def test_faults_get_their_status_and_the_server_keeps_serving(server):
    cases = [
        (post(server, "/v1/chat/completions", chat_body("hi"), key=None), 401),
        (post(server, "/v1/chat/completions", chat_body("hi"), key=OTHER_KEY), 401),
        (post(server, "/v1/chat/completions", b'{"model": "tiny", "messages": [}'), 400),
        (post(server, "/v1/chat/completions", {"model": MODEL}), 400),
        (post(server, "/v1/chat/completions", chat_body("hi", n=2)), 400),
        (post(server, "/v1/chat/completions", chat_body("hi", temperature=7)), 400),
        (post(server, "/v1/chat/completions", chat_body("hi", model="gpt-4o")), 404),
        (post(server, "/v1/chat/completions", chat_body("hi", kvfold={"method": "snapk:0.5"})), 400),
        (post(server, "/v1/chat/completions", chat_body("hi", kvfold={"method": "snapkv:1.5"})), 400),
        (post(server, "/v1/chat/completions", chat_body("hi", kvfold={"method": "xkv"})), 400),
        (post(server, "/v1/chat/completions", chat_body("hi", kvfold={"metod": "none"})), 400),
        (post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 3100}), 400),  # > --max-prompt-tokens
        (post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}), 400),  # > context
        (post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 40_000}), 413),  # > --max-body-bytes
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"]
        assert post(server, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2}).status_code == 200
    assert "did you mean 'snapkv'" in cases[7][0].json()["error"]["message"]
    assert cases[1][0].headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        client(server, OTHER_KEY).models.list()


def test_a_full_queue_answers_429_with_retry_after(server):
    server.engine.pause()
    queued: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: queued.append(post(server, "/v1/chat/completions", chat_body("first"))))
    try:
        waiter.start()
        deadline = time.monotonic() + 10
        while server.engine.queue_length < 1:  # --queue 1: the first request fills it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = post(server, "/v1/chat/completions", chat_body("second"))
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        server.engine.resume()
        waiter.join(30)
    assert queued[0].status_code == 200
    assert post(server, "/v1/chat/completions", chat_body("third")).status_code == 200


def test_a_request_refused_for_the_moment_says_when_to_retry(tokenizer):
    """A 503 of the moment (here the server stops while the request waits in its queue) carries Retry-After, as
    a 429 does; a request too large for the budget ever (`kv_budget_exceeded`) is refused without one."""
    with serving(tokenizer) as server:
        server.engine.pause()
        answers: list[httpx.Response] = []
        waiter = threading.Thread(target=lambda: answers.append(post(server, "/v1/chat/completions",
                                                                     chat_body("first"))))
        waiter.start()
        deadline = time.monotonic() + 10
        while server.engine.queue_length < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.engine.stop()
        waiter.join(30)
    assert answers[0].status_code == 503 and answers[0].headers["Retry-After"] == "1"
    assert "shutting down" in answers[0].json()["error"]["message"]


def test_a_client_that_goes_away_stops_generation_and_frees_its_cache(server):
    wait_idle(server)
    metrics = server.engine.metrics
    cancelled, generated = metrics.totals["cancelled"], metrics.totals["generated_tokens"]
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as stream:
        lines = stream.iter_lines()
        for _ in range(10):
            next(lines)
    wait_idle(server)
    assert metrics.totals["cancelled"] == cancelled + 1 and server.engine.live_bytes == 0
    assert metrics.totals["generated_tokens"] - generated < 3000
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the engine notices while the handler waits
        post(server, "/v1/completions", {"model": MODEL, "prompt": "again", "max_tokens": 3000}, timeout=0.5)
    wait_idle(server)
    assert metrics.totals["cancelled"] == cancelled + 2 and server.engine.live_bytes == 0
    assert metrics.totals["generated_tokens"] - generated < 6000
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "\nkvfold_kv_bytes_live 0\n" in text and "\nkvfold_cancelled_total 2\n" in text


def test_rate_limit_and_kv_budget(tokenizer):
    with serving(tokenizer, api_keys=(KEY, OTHER_KEY), rate_limit=2) as limited:
        models = [httpx.get(limited.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}) for _ in range(3)]
        assert [r.status_code for r in models[:2]] == [200, 200]
        refused = models[2]
        assert refused.status_code == 429 and 25 <= int(refused.headers["Retry-After"]) <= 30  # 1 token: 30 s
        assert client(limited, OTHER_KEY).models.list().data[0].id == MODEL  # another key: its own bucket
    small = tiny_serving_model(tokenizer)  # a budget for ~200 tokens of this model's KV
    budget = create_app(small, tokenizer, ServeConfig(model_id=MODEL)).state.engine.kv_needed(
        200, ServeConfig().compressor)
    with serving(tokenizer, kv_budget=budget) as tight:
        refused = post(tight, "/v1/completions", {"model": MODEL, "prompt": "tell me", "max_tokens": 1000})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "kv_budget_exceeded"
        assert "Retry-After" not in refused.headers  # no retry makes it fit
        ok = client(tight).completions.create(model=MODEL, prompt="tell me", max_tokens=20)
        assert ok.usage.completion_tokens == 20 and tight.engine.prefix.held <= budget


def test_prompts_stay_out_of_the_log_unless_asked(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="kvfold.serve")
    for log_prompts in (False, True):
        with serving(tokenizer, log_prompts=log_prompts) as target:
            client(target).completions.create(model=MODEL, prompt=f"SECRET-{log_prompts}", max_tokens=2)
        assert ("SECRET-" + str(log_prompts) in caplog.text) == log_prompts
    assert "2 generated" in caplog.text  # sizes are logged either way


def test_cli_refuses_bad_settings_before_loading_the_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvfold import cli

    monkeypatch.setattr(cli, "_load", lambda model, device, dtype: pytest.fail("the model was loaded"))
    for args, message in ((["--kv-budget", "lots"], "cannot read 'lots' as a size"),
                          (["--api-keys-file", str(tmp_path / "none")], "does not exist"),
                          (["--method", "snapkv:2"], "snapkv"), (["--api-key", "short"], "at least 8")):
        result = CliRunner().invoke(cli.app, ["serve", *args])
        assert isinstance(result.exception, KVFoldError) and message in str(result.exception)


def test_prefill_chunk_is_the_block_size(monkeypatch):
    from typer.testing import CliRunner

    from kvfold import cli, serve

    seen = {}
    monkeypatch.setattr(cli, "_load", lambda model, device, dtype: (None, None))
    monkeypatch.setattr(serve, "run_server", lambda lm, tok, config, **kw: seen.setdefault("block", config.block))
    result = CliRunner().invoke(cli.app, ["serve", "--prefill-chunk", "128"])
    assert result.exit_code == 0 and seen["block"] == 128


@pytest.mark.slow
def test_embedded_model_end_to_end(embedded):
    import torch

    model, tokenizer = embedded
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():  # transformers' own greedy answer, with its DynamicCache
        reference = model.generate(**ids, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(reference[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    app = create_app(model, tokenizer, ServeConfig(api_keys=(KEY,)))
    with BackgroundServer(app) as server:
        api, name = client(server), "embedded:SmolLM2-135M-Instruct"
        whole = api.chat.completions.create(model=name, messages=messages, max_tokens=8)
        chunks = api.chat.completions.create(model=name, messages=messages, max_tokens=8, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        packed = api.chat.completions.create(model=name, messages=messages, max_tokens=8,
                                             extra_body={"kvfold": {"method": "kivi:8"}})
    text = whole.choices[0].message.content
    assert text == expected and "Paris" in text and streamed == text
    assert whole.usage.prompt_tokens == ids["input_ids"].shape[1] and whole.usage.completion_tokens <= 8
    assert "Paris" in packed.choices[0].message.content and packed.usage.model_extra["kvfold"]["method"] == "kivi:8"


def _concurrently(server, bodies: list[dict]) -> list[httpx.Response]:
    """Queue every body while the engine is paused, then let it run them: they are admitted together."""
    server.engine.pause()
    answers: list[httpx.Response | None] = [None] * len(bodies)

    def send(i: int) -> None:
        answers[i] = post(server, "/v1/completions", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while server.engine.queue_length < len(bodies):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        server.engine.resume()
        for thread in threads:
            thread.join(60)
    return answers


def test_concurrent_requests_decode_together_and_answer_as_alone(tokenizer):
    """Four requests with prompts of different lengths and three methods run as one batch (continuous batching:
    one forward per step for all of them; each prompt prefilled 16 tokens per step between the others' decode
    steps) and each answers exactly what it answers alone, through the fast loop's segments (the default) and
    through the normal path."""
    methods = [None, "snapkv:0.5", "kivi:4,group=16,residual=16", None]
    bodies = [{"model": MODEL, "prompt": "story " * n, "max_tokens": 80, **({"kvfold": {"method": m}} if m else {})}
              for n, m in zip((3, 40, 17, 70), methods)]
    with serving(tokenizer, max_batch=4, block=16) as batched:
        alone = [post(batched, "/v1/completions", body).json() for body in bodies]
        assert batched.engine.peak_batch == 1
        together = [answer.json() for answer in _concurrently(batched, bodies)]
        assert batched.engine.peak_batch == 4
        assert [a["choices"][0]["text"] for a in together] == [a["choices"][0]["text"] for a in alone]
        assert [a["usage"]["kvfold"]["method"] for a in together] == [a["usage"]["kvfold"]["method"] for a in alone]
        metrics = httpx.get(batched.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert "\nkvfold_running_requests 0\n" in metrics and "kvfold_decode_steps" in metrics
    with serving(tokenizer, max_batch=4, block=16, fast=False) as normal:  # the normal per-step path: the same
        together = [answer.json() for answer in _concurrently(normal, bodies)]
        assert normal.engine.peak_batch == 4
        assert [a["choices"][0]["text"] for a in together] == [a["choices"][0]["text"] for a in alone]
    with serving(tokenizer, max_batch=2, block=16) as narrow:  # a third request waits for a place in the batch
        answers = _concurrently(narrow, bodies[:3])
        assert [a.status_code for a in answers] == [200] * 3 and narrow.engine.peak_batch == 2
        assert [a.json()["choices"][0]["text"] for a in answers] == [a["choices"][0]["text"] for a in alone[:3]]


def test_a_request_that_fits_alone_waits_for_room_instead_of_failing(tokenizer):
    """Under a KV budget for one request but not two, the second waits until the first ends: both answer."""
    body = {"model": MODEL, "prompt": "tell me a story of cats", "max_tokens": 60}  # one 16-token block
    need = create_app(tiny_serving_model(tokenizer), tokenizer, ServeConfig(model_id=MODEL)).state.engine.kv_needed(
        80, ServeConfig().compressor)
    with serving(tokenizer, kv_budget=int(need * 1.5), block=16) as tight:
        answers = _concurrently(tight, [body, body])
        assert [a.status_code for a in answers] == [200, 200] and tight.engine.peak_batch == 1
        assert answers[0].json()["choices"][0]["text"] == answers[1].json()["choices"][0]["text"]
        # the second request was refused room while it waited without touching the prefix cache: one lookup each
        assert tight.engine.prefix.hits + tight.engine.prefix.misses == 2


def test_an_engine_failure_fails_the_requests_in_flight_and_the_engine_keeps_serving(tokenizer):
    with serving(tokenizer) as fragile:
        step, failures = fragile.engine._step, []

        def failing_step():
            if not failures:
                failures.append(1)
                raise RuntimeError("a planted bug")
            step()

        fragile.engine._step = failing_step
        broken = post(fragile, "/v1/completions", {"model": MODEL, "prompt": "one", "max_tokens": 5})
        assert broken.status_code == 500 and failures == [1]
        wait_idle(fragile)
        assert fragile.engine.alive and fragile.engine.live_bytes == 0
        ok = post(fragile, "/v1/completions", {"model": MODEL, "prompt": "two", "max_tokens": 5})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5

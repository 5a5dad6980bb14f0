"""The OpenAI-compatible API through the official ``openai`` client, against the cluster it serves:
every answer is checked against the cluster's own ``generate`` on the same messages and parameters."""

import json
import time
import urllib.error
import urllib.request

import pytest

from model.sampling import SamplingParams

openai = pytest.importorskip("openai")

KEY = "test-key"  # the ``served`` fixture starts the server with it


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["url"] + "v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(served):
    return served["llm"].describe()["model"]


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is an expert?"}]


def test_models_and_auth(served, client, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).id == model
    nokey = openai.OpenAI(base_url=served["url"] + "v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        nokey.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        nokey.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["param"] == "model"


def test_health_needs_no_key(served):
    with urllib.request.urlopen(served["url"] + "health", timeout=30) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "healthy"


def test_chat_completion_equals_the_clusters_generate(served, client, model):
    llm = served["llm"]
    expected = llm.generate([MESSAGES], SamplingParams(temperature=0, max_new_tokens=16))[0]
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_completion_tokens=16)
    assert r.object == "chat.completion" and r.model == model and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(llm.encode(MESSAGES)) == len(expected.prompt_ids)
    assert r.usage.completion_tokens == len(expected.output_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_chunks(served, client, model):
    expected = served["llm"].generate([MESSAGES], SamplingParams(temperature=0, max_new_tokens=20))[0]
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == expected.text and len(with_choices) > 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.output_ids)
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_ids)


def test_streamed_logprobs_come_with_their_chunks(served, client, model):
    """As vLLM streams them: each token's logprobs in the chunk of that token (not all in the last),
    the same values as the request without streaming, and the same text."""
    llm = served["llm"]
    expected = llm.generate([MESSAGES], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True,
                                                       logprobs=2))[0]
    chunks = [c for c in client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=12, stream=True, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True}) if c.choices]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert sum(1 for c in chunks if c.choices[0].logprobs and c.choices[0].logprobs.content) > 1
    assert [t.logprob for t in streamed] == pytest.approx(expected.token_logprobs, abs=1e-5)
    assert [a.logprob for t in streamed for a in t.top_logprobs] == pytest.approx(
        [lp for top in expected.top_logprobs for _, lp in top], abs=1e-5)
    assert [bytes(t.bytes) for t in streamed] == llm.token_bytes(expected.output_ids)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text


def test_completions_with_n_and_seed(served, client, model):
    llm = served["llm"]
    prompt = "The expert actor"
    r = client.completions.create(model=model, prompt=prompt, n=3, seed=11, temperature=1.0, top_p=0.9,
                                  max_tokens=10, extra_body={"top_k": 40})
    expected = llm.generate([prompt] * 3, [SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=11 + i,
                                                          max_new_tokens=10) for i in range(3)])
    assert r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [e.text for e in expected]
    assert len({c.text for c in r.choices}) > 1  # the choices differ
    assert r.usage.completion_tokens == sum(len(e.output_ids) for e in expected)
    # any 64-bit seed, negative included, with n > 1 wrapping within 64 bits
    r = client.completions.create(model=model, prompt=prompt, n=2, seed=2**63 - 1, max_tokens=2)
    assert len(r.choices) == 2
    assert client.completions.create(model=model, prompt=prompt, seed=-1, max_tokens=2).choices[0].text is not None


def test_logprobs(served, client, model):
    llm = served["llm"]
    expected = llm.generate([MESSAGES], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True,
                                                       logprobs=3))[0]
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=5, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == llm.token_texts(expected.output_ids[:len(content)])
    for c, lp, top in zip(content, expected.token_logprobs, expected.top_logprobs, strict=False):
        assert c.logprob == pytest.approx(lp, abs=1e-5)
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([x[1] for x in top], abs=1e-5)
        assert c.top_logprobs[0].token == c.token  # greedy: the picked token is the most likely
        assert c.top_logprobs[0].bytes == c.bytes
    # each token's own bytes (Tokenizer.token_bytes: a piece of a character too, not U+FFFD's)
    assert [bytes(c.bytes) for c in content] == llm.token_bytes(expected.output_ids[:len(content)])
    cr = client.completions.create(model=model, prompt="Hello", temperature=0, max_tokens=4, logprobs=2)
    lp = cr.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(t) <= 2 for t in lp.top_logprobs) and "".join(lp.tokens).startswith(cr.choices[0].text[:1])


def test_stop_strings(served, client, model):
    llm = served["llm"]
    full = llm.generate(["Hello world"], SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))[0].text
    stop = full[6:9]
    assert stop and stop in full
    r = client.completions.create(model=model, prompt="Hello world", temperature=0, max_tokens=24, stop=[stop, "zzqx"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("bad, param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": 3}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 10**9}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"),
    ({"seed": 1.5}, "seed"), ({"stop": 5}, "stop"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"), ({"messages": "hi"}, "messages"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
])
def test_bad_values_are_400_naming_the_parameter(client, model, bad, param):
    kw = {"model": model, "messages": MESSAGES, "max_tokens": 4, **bad}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param and e.value.body["message"]


def test_malformed_body_is_a_json_error(served):
    req = urllib.request.Request(served["url"] + "v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]


def test_a_client_that_disconnects_cancels_its_request(served, client, model):
    llm = served["llm"]
    before = set(llm.engine.requests)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=3000,
                                            stream=True)
    for i, _ in enumerate(stream):
        if i >= 3:
            break
    stream.close()
    (rid,) = set(llm.engine.requests) - before
    seq = llm.engine.requests[rid].seq
    deadline = time.time() + 60
    while time.time() < deadline and not seq.finished:
        time.sleep(0.05)
    assert seq.finish_reason == "cancelled" and len(seq.output_ids) < 3000


def test_unhealthy_cluster_is_503_and_no_key_means_open():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tests.ui.fake_llm import FakeLLM
    from ui.openai_api import openai_routes

    class Down(FakeLLM):
        def health(self):
            return {"state": "unhealthy", "error": "no node can take the actors"}

    app = TestClient(FastAPI(routes=openai_routes(Down())))  # no key configured: /v1 is open
    assert app.get("/v1/models").status_code == 200
    assert app.get("/health").status_code == 503
    r = app.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
    assert r.status_code == 503 and "no node can take the actors" in r.json()["error"]["message"]


def test_limits_and_unsupported_values_without_a_cluster():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tests.ui.fake_llm import FakeLLM
    from ui.openai_api import openai_routes

    class Small(FakeLLM):  # a shard cache that holds 100 tokens per sequence
        def describe(self):
            return {**super().describe(), "max_sequence_tokens": 100}

    app = TestClient(FastAPI(routes=openai_routes(Small())))
    assert app.get("/v1/models").json()["data"][0]["max_model_len"] == 100
    body = {"model": "tiny", "prompt": "Hello"}
    r = app.post("/v1/completions", json={**body, "max_tokens": 200})
    assert r.status_code == 400 and "100 tokens a sequence may hold" in r.json()["error"]["message"]
    for bad, param in (({"echo": True}, "echo"), ({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"),
                       ({"temperature": 10**400}, "temperature")):
        r = app.post("/v1/completions", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    r = app.post("/v1/completions", content=b"[" * 100000 + b"]" * 100000)
    assert r.status_code in (400, 401, 404) and "error" in r.json()

"""The OpenAI API's request checks and its streams, over a fake cluster (``tests/ui/fake_llm.py``) in
FastAPI's test client: no Ray, no port."""

import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cluster.engine import StreamEvent
from tests.ui.fake_llm import FakeLLM
from ui.chat import MAX_CHARS
from ui.openai_api import openai_routes

MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 8})
COMPLETION = ("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 8})


def _api(llm=None):
    llm = llm or FakeLLM()
    return llm, TestClient(FastAPI(routes=openai_routes(llm)), raise_server_exceptions=False)


def _raw(api, url: str, body: bytes):
    """A body as JSON text, so that it can carry what Python cannot encode (``"\\ud800"``)."""
    return api.post(url, content=body, headers={"Content-Type": "application/json"})


def _events(text: str) -> list[str]:
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e]


def _error(r, status: int, param: str) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error["message"]


@pytest.mark.parametrize("route", [CHAT, COMPLETION], ids=["chat", "completions"])
@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"logit_bias": {"50": 10}}, "logit_bias"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"min_tokens": 4}, "min_tokens"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"min_p": 0.1}, "min_p"),
])
def test_parameters_that_change_the_output_are_refused_not_ignored(route, extra, param):
    llm, api = _api()
    url, body = route
    r = api.post(url, json={**body, **extra})
    assert f"'{param}' is not supported by this server" in _error(r, 400, param)
    assert r.json()["error"]["code"] == "unsupported_parameter"
    assert llm.submitted == []


def test_the_values_that_mean_off_are_accepted():
    llm, api = _api()
    off = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {},
           "functions": [], "function_call": "none", "min_tokens": 0, "repetition_penalty": 1.0, "min_p": 0,
           "best_of": 1, "presence_penalty": 0, "stream_options": None}
    for extra in (off, {"tools": None, "tool_choice": None, "logit_bias": None, "response_format": None}):
        r = api.post(CHAT[0], json={**CHAT[1], **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == llm.reply


def test_vllm_extensions_reach_the_sampling_params():
    llm, api = _api()
    for url, body in (CHAT, COMPLETION):
        r = api.post(url, json={**body, "ignore_eos": True, "stop_token_ids": [3, 7], "skip_special_tokens": False})
        assert r.status_code == 200, r.text
        params = llm.submitted[-1][1]
        assert (params.ignore_eos, params.stop_token_ids, params.skip_special_tokens) == (True, (3, 7), False)
        assert api.post(url, json=body).status_code == 200
        params = llm.submitted[-1][1]
        assert (params.ignore_eos, params.stop_token_ids, params.skip_special_tokens) == (False, (), True)


def test_generation_config_gives_the_defaults_a_request_leaves_out():
    """As vLLM applies a checkpoint's generation_config.json: its sampling values where the request
    has none (its end-of-sequence ids stop every sequence: ``Sequence``, tested in test_generate)."""
    llm, api = _api(FakeLLM(generation_defaults={"temperature": 0.6, "top_p": 0.95, "eos_token_ids": [1, 9]}))
    for url, body in (CHAT, COMPLETION):
        assert api.post(url, json=body).status_code == 200
        p = llm.submitted[-1][1]
        assert (p.temperature, p.top_p, p.top_k, p.stop_token_ids) == (0.6, 0.95, 0, ())
        assert api.post(url, json={**body, "temperature": 0, "top_p": 1, "stop_token_ids": [9, 4]}).status_code == 200
        p = llm.submitted[-1][1]
        assert (p.temperature, p.top_p, p.stop_token_ids) == (0.0, 1.0, (9, 4))


def test_the_body_vllm_bench_serve_sends_takes_effect():
    # ``vllm bench serve --ignore-eos`` against /v1/completions
    llm, api = _api()
    body = {"model": "tiny", "prompt": "Hello", "repetition_penalty": 1.0, "max_tokens": 8, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = api.post("/v1/completions", json=body)
    events = _events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == llm.reply
    assert json.loads(events[-2])["usage"]["completion_tokens"] > 0
    ((_, params),) = llm.submitted
    assert params.ignore_eos is True and params.max_new_tokens == 8


@pytest.mark.parametrize("extra, param", [
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"skip_special_tokens": 0}, "skip_special_tokens"), ({"skip_special_tokens": "false"}, "skip_special_tokens"),
    ({"stop_token_ids": 3}, "stop_token_ids"), ({"stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": ["3"]}, "stop_token_ids"), ({"stop_token_ids": [5, 1000]}, "stop_token_ids"),
    ({"min_tokens": "4"}, "min_tokens"), ({"min_tokens": 1.0}, "min_tokens"),
])
def test_vllm_extensions_are_type_checked(extra, param):
    llm, api = _api()
    for url, body in (CHAT, COMPLETION):
        _error(api.post(url, json={**body, **extra}), 400, param)
    assert llm.submitted == []
    assert api.post(CHAT[0], json={**CHAT[1], "stop_token_ids": [0, 999]}).status_code == 200
    r = api.post(CHAT[0], json={**CHAT[1], "stop_token_ids": [1000]})
    assert "integers 0..999" in _error(r, 400, "stop_token_ids")


class Tokenizing(FakeLLM):
    """Encodes as ``tokenizers`` does: a lone surrogate is a ``TypeError``."""

    def encode(self, prompt):
        try:
            json.dumps(prompt, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError("TextInputSequence must be str") from None
        return super().encode(prompt)


@pytest.mark.parametrize("body, param, problem", [
    (b'{"model": "tiny", "prompt": "\\ud800 hi"}', "prompt", "'prompt' holds an invalid character"),
    (b'{"model": "tiny", "prompt": ["hi \\udfff"]}', "prompt", "'prompt' holds an invalid character"),
    (b'{"model": "tiny", "prompt": "' + b"a" * (MAX_CHARS + 1) + b'"}', "prompt",
     f"'prompt' is {MAX_CHARS + 1:,} characters long"),
    (b'{"model": "tiny", "prompt": "hi", "stop": ["\\ud800"]}', "stop", "'stop' holds an invalid character"),
])
def test_completion_text_is_checked_as_chat_text_is(body, param, problem):
    llm, api = _api(Tokenizing())
    assert problem in _error(_raw(api, "/v1/completions", body), 400, param)
    assert llm.submitted == []


def test_a_model_name_with_a_lone_surrogate_is_a_404():
    _, api = _api()
    r = _raw(api, CHAT[0], b'{"model": "\\ud800x", "messages": [{"role": "user", "content": "Hi"}]}')
    assert '"\\ud800x" does not exist' in _error(r, 404, "model")
    assert r.json()["error"]["code"] == "model_not_found"


class LostMidStream(FakeLLM):
    def stream(self, request_id):
        yield StreamEvent("Hel", [1])
        raise RuntimeError("the expert actor was lost")


class FailedMidStream(FakeLLM):
    def stream(self, request_id):
        yield StreamEvent("Hel", [1])
        yield StreamEvent("", [], True, SimpleNamespace(
            error="the expert actor was lost", text="Hel", output_ids=[1], finish_reason="error", token_logprobs=[],
            top_logprobs=[]))


@pytest.mark.parametrize("fake", [LostMidStream, FailedMidStream])
@pytest.mark.parametrize("route", [CHAT, COMPLETION], ids=["chat", "completions"])
def test_an_error_mid_stream_is_an_error_event_then_done(fake, route):
    _, api = _api(fake())
    url, body = route
    r = api.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    events = _events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert "the expert actor was lost" in error["message"] and error["type"] == "server_error"
    choice = json.loads(events[-3])["choices"][0]
    assert (choice["delta"]["content"] if "messages" in body else choice["text"]) == "Hel"


def test_text_parts_are_joined_one_per_line():
    class Recording(FakeLLM):
        def encode(self, prompt):
            self.encoded = prompt
            return super().encode(prompt)

    llm, api = _api(Recording())
    content = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    r = api.post(CHAT[0], json={**CHAT[1], "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200 and llm.encoded == [{"role": "user", "content": "Hello\nworld"}]


def test_max_tokens_are_checked_and_named_as_sent():
    class Small(FakeLLM):  # 100 tokens per sequence
        def describe(self):
            return {**super().describe(), "max_sequence_tokens": 100}

    llm, api = _api(Small())
    body = {"model": "tiny", "messages": MESSAGES}
    _error(api.post(CHAT[0], json={**body, "max_completion_tokens": 8, "max_tokens": "many"}), 400, "max_tokens")
    _error(api.post(CHAT[0], json={**body, "max_completion_tokens": 8, "max_tokens": 0}), 400, "max_tokens")
    message = _error(api.post(CHAT[0], json={**body, "max_completion_tokens": 500}), 400, "max_completion_tokens")
    assert message.startswith("max_completion_tokens 500 + ")
    message = _error(api.post(CHAT[0], json={**body, "max_tokens": 500}), 400, "max_tokens")
    assert message.startswith("max_tokens 500 + ")
    assert llm.submitted == []
    assert api.post(CHAT[0], json={**body, "max_completion_tokens": 5, "max_tokens": 50}).status_code == 200
    assert llm.submitted[-1][1].max_new_tokens == 5


@pytest.mark.parametrize("route", [CHAT, COMPLETION], ids=["chat", "completions"])
def test_stream_options_need_stream(route):
    llm, api = _api()
    url, body = route
    for stream in ({}, {"stream": False}):
        r = api.post(url, json={**body, **stream, "stream_options": {"include_usage": True}})
        assert "only allowed with 'stream': true" in _error(r, 400, "stream_options")
    assert llm.submitted == []
    r = api.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and _events(r.text)[-1] == "[DONE]"


@pytest.mark.parametrize("best_of, problem", [(1.0, "must be an integer"), (True, "must be an integer"),
                                              ("1", "must be an integer"), (2, "is not supported")])
def test_best_of_is_one_as_an_integer(best_of, problem):
    llm, api = _api()
    assert problem in _error(api.post(COMPLETION[0], json={**COMPLETION[1], "best_of": best_of}), 400, "best_of")
    assert llm.submitted == []
    assert api.post(COMPLETION[0], json={**COMPLETION[1], "best_of": 1}).status_code == 200


def test_a_body_over_the_cap_is_a_413(monkeypatch):
    import ui.openai_api

    monkeypatch.setattr(ui.openai_api, "MAX_BODY_BYTES", 1000)
    llm, api = _api()
    body = json.dumps({**CHAT[1], "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    r = _raw(api, CHAT[0], body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert not llm.submitted
    assert _raw(api, CHAT[0], json.dumps(CHAT[1]).encode()).status_code == 200

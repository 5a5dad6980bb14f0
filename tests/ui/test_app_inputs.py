"""The ``/chat`` endpoint's inputs and the serving settings, on the page over a fake cluster (no Ray)."""

import argparse
import json
import logging
import re
import urllib.request

import pytest

from tests.ui.conftest import free_port
from tests.ui.fake_llm import FakeLLM


@pytest.fixture(scope="module")
def fake_served():
    from ui.app import build_app

    llm = FakeLLM("Hello there, I am fake.")
    app = build_app(llm, refresh_s=60)
    app.queue(default_concurrency_limit=4)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield {"llm": llm, "url": f"http://127.0.0.1:{port}/"}
    app.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_chat_takes_the_message_alone(fake_served):
    llm = fake_served["llm"]
    before = len(llm.submitted)
    assert _client(fake_served["url"]).predict("Hello", api_name="/chat") == "Hello there, I am fake."
    assert llm.submitted[before][0] == [{"role": "user", "content": "Hello"}]


def test_chat_history_in_gradio_parts_reaches_the_cluster_as_text(fake_served):
    llm = fake_served["llm"]
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Yo"}]
    _client(fake_served["url"]).predict("More", history, "", 0.0, 1.0, 0, 8, api_name="/chat")
    assert llm.submitted[-1][0] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                    {"role": "user", "content": "More"}]


@pytest.mark.parametrize("args, problem", [
    (("",), "Type a message first"),
    ((5,), "the message must be text"),
    (("Hi", "a string"), "history must be a list"),
    (("Hi", ["Hi", "Hello"]), r"history\[0\] must be an object"),
    (("Hi", [{"content": "no role"}]), r"history\[0\] must be an object with 'role' and 'content'"),
    (("Hi", [], "", 0.7, 0.9, 2.5), "top_k must be a whole number"),
])
def test_a_rejected_input_is_a_message_and_one_log_line(fake_served, capfd, caplog, args, problem):
    from gradio_client.exceptions import AppError

    llm = fake_served["llm"]
    before = len(llm.submitted)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="raymoe.ui"), pytest.raises(AppError, match=problem):
        _client(fake_served["url"]).predict(*args, api_name="/chat")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    records = [r for r in caplog.records if r.name == "raymoe.ui"]
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert "chat request rejected" in records[0].getMessage()
    assert len(llm.submitted) == before


def test_a_lone_surrogate_is_a_message(fake_served, capfd):
    # JSON can carry "\\ud800", which Python reads as a lone surrogate (gradio_client cannot send one)
    url = fake_served["url"] + "gradio_api/call/chat"
    body = b'{"data": ["Hi \\ud800 there", null, "", 0.7, 0.95, 0, 8]}'
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    capfd.readouterr()
    stream = urllib.request.urlopen(f"{url}/{event_id}", timeout=30).read().decode()
    assert "event: error" in stream and "the message holds an invalid character" in stream
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def _serve_args(*argv: str) -> argparse.Namespace:
    from cluster.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_serve_takes_no_share_link_or_analytics_from_the_environment(monkeypatch):
    import gradio as gr

    import cluster.api
    from ui import serve

    monkeypatch.setenv("GRADIO_SHARE", "True")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    monkeypatch.setenv("GRADIO_MCP_SERVER", "True")
    llm = FakeLLM()
    monkeypatch.setattr(cluster.api.RayMoE, "start", classmethod(lambda cls, *a, **k: llm))
    monkeypatch.setattr(serve, "check_serving_flags", lambda args: None)  # 7860 may be in use on this machine
    launched = []

    class Launched(Exception):
        pass

    def launch(self, **kwargs):  # records what ``raymoe serve`` asks for; opens no port, no tunnel
        launched.append((self, kwargs))
        raise Launched

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    for argv, share in [((), False), (("--host", "0.0.0.0", "--allow-remote"), False),
                        (("--host", "0.0.0.0", "--allow-remote", "--share"), True)]:
        with pytest.raises(Launched):
            serve.main(_serve_args(*argv))
        app, kwargs = launched.pop()
        assert kwargs["share"] is share
        assert kwargs["mcp_server"] is False and kwargs["ssr_mode"] is False
        assert gr.utils._parse_file_size(kwargs["max_file_size"]) <= 1024
        assert app.analytics_enabled is False
    with pytest.raises(ValueError, match="--share opens a public link"):
        serve.main(_serve_args("--share"))
    assert not launched


@pytest.mark.parametrize("argv, env, says", [
    (("--api-key", "k"), None, "key required; the page and its /chat API take no key (loopback only)"),
    ((), "k", "key required; the page and its /chat API take no key (loopback only)"),
    (("--api-key", "k", "--host", "0.0.0.0", "--allow-remote"), None,
     "key required; the page and its /chat API ask for it too"),
    ((), None, "no key: as open as the page"),
])
def test_serve_says_what_the_key_guards(monkeypatch, capsys, argv, env, says):
    import signal
    from types import SimpleNamespace

    import cluster.api
    from ui import serve

    if env is None:
        monkeypatch.delenv("RAYMOE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("RAYMOE_API_KEY", env)
    monkeypatch.setattr(cluster.api.RayMoE, "start", classmethod(lambda cls, *a, **k: FakeLLM()))
    monkeypatch.setattr(serve, "check_serving_flags", lambda args: None)  # 7860 may be in use on this machine
    given = []
    app = SimpleNamespace(local_url="http://127.0.0.1:7860/", share_url=None, close=lambda: None)
    monkeypatch.setattr(serve, "start_server", lambda llm, launch, *a: given.append(a) or app)  # no port
    monkeypatch.setattr(serve, "threading", SimpleNamespace(Event=lambda: SimpleNamespace(wait=lambda s: True)))
    monkeypatch.setattr(serve, "signal", SimpleNamespace(SIGINT=signal.SIGINT, SIGTERM=signal.SIGTERM,
                                                         signal=lambda *a: None))
    assert serve.main(_serve_args(*argv)) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "OpenAI API" in x]
    assert line.endswith(f"/v1 (model 'tiny', {says})")
    assert given[0][2] == ("k" if argv or env else None)  # the key reaches the /v1 routes


@pytest.mark.parametrize("argv, problem", [
    (("--port", "70000"), "--port must be in 1..65535"), (("--refresh", "0"), "--refresh must be > 0"),
    (("--max-sessions", "0"), "--max-sessions must be >= 1"), (("--port", "BUSY"), "cannot listen on 127.0.0.1:"),
])
def test_serve_checks_its_page_flags_before_the_cluster_starts(monkeypatch, argv, problem):
    import socket

    import cluster.api
    from ui import serve

    started = []
    monkeypatch.setattr(cluster.api.RayMoE, "start", classmethod(lambda cls, *a, **k: started.append(1)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = tuple(str(busy.getsockname()[1]) if a == "BUSY" else a for a in argv)
        with pytest.raises(ValueError, match=re.escape(problem)):
            serve.main(_serve_args(*argv))
    assert not started


def test_a_key_on_a_remote_server_guards_the_page_too():
    """With --allow-remote and a key, Gradio's login (any user name, the key as the password) guards
    the page and its /chat API; on loopback, or without a key, there is no login."""
    from ui import serve

    def auth(*argv, key=None):
        return serve.launch_options(_serve_args(*argv), key).get("auth")

    login = auth("--host", "0.0.0.0", "--allow-remote", key="sesame")
    assert login("anyone", "sesame") and not login("anyone", "sesam") and not login("sesame", "")
    assert auth(key="sesame") is None and auth("--host", "0.0.0.0", "--allow-remote") is None

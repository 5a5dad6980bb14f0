"""The web page through gradio_client and a real headless browser; metrics on Prometheus."""

import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from model.sampling import SamplingParams

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_chat_streams_the_clusters_greedy_reply(served):
    llm = served["llm"]
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    job = _client(served["url"]).submit("What is an expert?", history, "Be brief.", 0.0, 1.0, 0, 24,
                                        api_name="/chat")
    pieces = list(job)
    expected = llm.generate([[{"role": "system", "content": "Be brief."}, *history,
                              {"role": "user", "content": "What is an expert?"}]],
                            SamplingParams(temperature=0, max_new_tokens=24))[0]
    assert pieces[-1] == expected.text
    assert len(set(pieces)) > 2  # it arrived in pieces, each extending the last
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))


def test_stop_cancels_the_request_in_the_cluster(served):
    llm = served["llm"]
    before = set(llm.engine.requests)
    job = _client(served["url"]).submit("Tell me a long story", [], "", 0.0, 1.0, 0, 2000, api_name="/chat")
    deadline = time.time() + 120
    while time.time() < deadline and not job.outputs():
        time.sleep(0.1)
    assert job.outputs(), "no streamed output"
    job.cancel()
    (request_id,) = set(llm.engine.requests) - before
    req = llm.engine.requests[request_id]
    deadline = time.time() + 60
    while time.time() < deadline and not req.seq.finished:
        time.sleep(0.1)
    assert req.seq.finish_reason == "cancelled"
    assert len(req.seq.output_ids) < 2000


def test_too_long_prompt_is_a_message_not_a_crash(served):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="context"):
        _client(served["url"]).predict("word " * 5000, [], "", 0.0, 1.0, 0, 8, api_name="/chat")


def test_metrics_reach_prometheus(served):
    served["llm"].generate(["Hello metrics"], SamplingParams(temperature=0, max_new_tokens=8))
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        try:
            text = urllib.request.urlopen(served["metrics"], timeout=5).read().decode()
        except OSError:
            text = ""
        if "raymoe_generated_tokens" in text and "raymoe_time_to_first_token_seconds" in text:
            break
        time.sleep(1)
    assert "raymoe_generated_tokens" in text
    assert "raymoe_time_to_first_token_seconds" in text and "raymoe_expert_tokens" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_chat_and_cluster_tabs(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                        args=args, headless=True,
                                                        viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()
            page.goto(served["url"], wait_until="networkidle")
            box = page.locator("#raymoe-message textarea")
            box.fill("Hello from the browser")
            box.press("Enter")
            bubbles = page.locator("#raymoe-chatbot .message")
            page.wait_for_function(
                "() => { const m = document.querySelectorAll('#raymoe-chatbot .message');"
                " return m.length >= 2 && m[m.length - 1].innerText.trim().length > 0; }", timeout=120_000)
            assert "Hello from the browser" in bubbles.first.inner_text()
            time.sleep(1)
            page.screenshot(path=str(ARTIFACTS / "chat-tab.png"), full_page=True)
            page.get_by_role("tab", name="Cluster").click()
            page.wait_for_selector(".raymoe-heatmap table", timeout=60_000)
            text = page.inner_text("body")
            assert "attention" in text and "expert" in text and "tokens/s" in text
            assert "Expert placement" in text and "max/mean rows per expert actor" in text
            page.screenshot(path=str(ARTIFACTS / "cluster-tab.png"), full_page=True)
        finally:
            browser.close()


def test_chat_takes_the_message_alone(served):
    llm = served["llm"]
    before = set(llm.engine.requests)
    reply = _client(served["url"]).predict("Hello", api_name="/chat")
    (request_id,) = set(llm.engine.requests) - before
    seq = llm.engine.requests[request_id].seq
    assert seq.prompt_ids == llm.encode([{"role": "user", "content": "Hello"}])
    assert seq.params.temperature == 0.7 and seq.params.max_new_tokens == 256  # the page's defaults
    assert reply == seq.text

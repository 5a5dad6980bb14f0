"""The chat logic behind the page and the ``/chat`` endpoint (``ui/chat.py``) on a fake cluster: no
Ray, no Gradio server."""

import pytest

from model.sampling import SamplingParams
from tests.ui.fake_llm import FakeLLM
from ui.chat import MAX_CHARS, MAX_HISTORY, ChatError, check_messages, conversation, sampling, stream_reply


def _deep(depth: int):
    """A list nested ``depth`` deep (built without recursion), past Python's recursion limit."""
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_history_is_optional_and_takes_the_documented_shapes():
    assert conversation("Hi") == [{"role": "user", "content": "Hi"}]
    assert conversation("Hi", None, None) == [{"role": "user", "content": "Hi"}]
    history = [{"role": "system", "content": "Be kind."},
               {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
               {"role": "assistant", "content": "Hi!", "metadata": None, "options": None}]
    assert conversation("More", history, "Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hel\nlo"}, {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "More"}]


def test_text_parts_are_joined_one_per_line_as_vllm_does():
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert check_messages([{"role": "user", "content": parts}]) == [{"role": "user", "content": "Hello\nworld"}]
    assert check_messages([{"role": "user", "content": parts[:1]}]) == [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("history, problem", [
    ("Hi there", "history must be a list"),
    (["Hi", "Hello"], r"history\[0\] must be an object with 'role' and 'content', got 'Hi'"),
    ([{"content": "Hi"}], r"history\[0\] must be an object with 'role' and 'content'"),
    ([{"role": "user"}], r"history\[0\] must be an object with 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"history\[1\]\.role .* got 'bot'"),
    ([{"role": ["user"], "content": "a"}], r"history\[0\]\.role .* got a list"),
    ([{"role": "user", "content": 5}], r"history\[0\]\.content must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": None}], r"history\[0\]\.content .* got null"),
    ([{"role": "user", "content": [{"type": "file", "file": {"path": "/etc/passwd"}}]}],
     r"history\[0\]\.content\[0\] must be a text part"),
    ([{"role": "user", "content": [{"type": "text", "text": 7}]}], r"history\[0\]\.content\[0\]\.text must be text"),
    ([{"role": "user", "content": _deep(100_000)}], r"history\[0\]\.content\[0\] must be a text part"),
    ([{"role": "user", "content": {"text": "Hi"}}], r"history\[0\]\.content .* got an object"),
    (_deep(100_000), r"history\[0\] must be an object"),
])
def test_malformed_history_is_an_error_that_names_the_problem(history, problem):
    with pytest.raises(ChatError, match=problem):
        conversation("Hi", history)


@pytest.mark.parametrize("message, history, system_prompt, problem", [
    (5, None, "", "the message must be text .* got int"),
    (None, None, "", "the message must be text .* got null"),
    (["Hi"], None, "", "the message must be text .* got a list"),
    ("   ", None, "", "Type a message first"),
    ("Hi \ud800", None, "", "the message holds an invalid character"),
    ("Hi", None, "Be \udfff brief", "the system prompt holds an invalid character"),
    ("Hi", None, 3, "the system prompt must be text"),
    ("Hi", [{"role": "user", "content": "\ud800"}], "", r"history\[0\]\.content holds an invalid character"),
    ("Hi", [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}], "",
     r"history\[0\]\.content\[0\]\.text holds an invalid character"),
])
def test_bad_text_is_an_error_that_names_the_problem(message, history, system_prompt, problem):
    with pytest.raises(ChatError, match=problem):
        conversation(message, history, system_prompt)


def test_sizes_are_bounded():
    turn = [{"role": "user", "content": "a"}]
    assert len(conversation("Hi", turn * MAX_HISTORY)) == MAX_HISTORY + 1
    with pytest.raises(ChatError, match=f"history has {MAX_HISTORY + 1:,} messages; the limit is {MAX_HISTORY:,}"):
        conversation("Hi", turn * (MAX_HISTORY + 1))
    with pytest.raises(ChatError, match=f"the message is {MAX_CHARS + 1:,} characters long"):
        conversation("a" * (MAX_CHARS + 1))
    half = [{"role": "user", "content": "a" * (MAX_CHARS // 2)}]
    with pytest.raises(ChatError, match="the conversation is .* characters long"):
        conversation("Hi", half * 2)


def test_sampling_values_are_checked():
    assert sampling(0, 1, 5.0, 16) == SamplingParams(temperature=0.0, top_p=1.0, top_k=5, max_new_tokens=16)
    for values, problem in [((None, 1, 0, 8), "temperature must be a finite number, got null"),
                            ((0.5, "0.9", 0, 8), "top_p must be a finite number, got a string"),
                            ((0.5, 0.9, 2.5, 8), "top_k must be a whole number, got 2.5"),
                            ((0.5, 0.9, 0, float("inf")), "max_new_tokens must be a finite number"),
                            ((0.5, 0.9, 0, True), "max_new_tokens must be a finite number, got bool"),
                            ((-1, 0.9, 0, 8), "temperature must be >= 0")]:
        with pytest.raises(ChatError, match=problem):
            sampling(*values)


def test_stream_reply_sends_the_conversation_and_streams_the_reply():
    llm = FakeLLM("Hello there!", piece=5)
    pieces = list(stream_reply(llm, "Hi", [{"role": "assistant", "content": [{"type": "text", "text": "Yo"}]}],
                               "", 0, 1, 0, 8))
    assert pieces == ["Hello", "Hello ther", "Hello there!"]
    assert llm.submitted == [([{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Hi"}],
                              SamplingParams(temperature=0, top_p=1, top_k=0, max_new_tokens=8))]
    assert llm.cancelled == []
    with pytest.raises(ChatError, match="longer than the model's context"):
        list(stream_reply(llm, "word " * 3000))
    with pytest.raises(ChatError, match="must be a list"):
        list(stream_reply(llm, "Hi", "not a history"))
    assert len(llm.submitted) == 1  # a rejected input never reaches the cluster
    stream = stream_reply(llm, "Hi")
    next(stream)
    stream.close()  # the stop button
    assert llm.cancelled == [1]


def test_a_cluster_that_cannot_serve_is_a_chat_error_not_a_traceback():
    from cluster.api import ClusterUnavailable

    class Down(FakeLLM):
        def submit(self, messages, params):
            raise ClusterUnavailable("the cluster is unhealthy: no node can take the actors")

    with pytest.raises(ChatError, match="unhealthy"):
        next(stream_reply(Down(), "Hi"))

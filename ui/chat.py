"""The chat logic behind the page and the ``chat`` API endpoint (no Gradio imports here).

A history is Gradio's ``messages`` format, as the page's Chatbot and API clients send it: a list of
``{"role": "user" | "assistant" | "system", "content": text}`` where text is a string or a list of
text parts ``{"type": "text", "text": "..."}``, joined with newlines (other keys, such as Gradio's
``metadata``, are ignored); ``None`` is an empty history. Anything else is a ``ChatError`` that names the place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from cluster.api import ClusterUnavailable, SamplingParams

ROLES = ("user", "assistant", "system")
MAX_HISTORY = 1000  # messages
# message + history + system prompt, in characters: past the longest context of the DeepSeek-V3
# family (163,840 tokens at a few characters each), yet small enough to check and tokenize quickly
MAX_CHARS = 2_000_000


class ChatError(Exception):
    """A message for the person in the page (the UI shows it instead of a stack trace)."""


def _kind(value) -> str:
    """What a value is, for an error message: never its repr, which can be huge or nested past the
    recursion limit."""
    if isinstance(value, str) and re.fullmatch(r"\w{1,20}", value):
        return repr(value)
    return {type(None): "null", str: "a string", list: "a list", dict: "an object"}.get(type(value),
                                                                                        type(value).__name__)


def check_text(value, where: str) -> str:
    """``value`` if it is a string of valid Unicode within ``MAX_CHARS``; else a ``ChatError``
    naming ``where``."""
    if not isinstance(value, str):
        raise ChatError(f"{where} must be text (a string), got {_kind(value)}")
    if len(value) > MAX_CHARS:
        raise ChatError(f"{where} is {len(value):,} characters long; the limit is {MAX_CHARS:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatError(f"{where} holds an invalid character (a lone surrogate such as \\ud800); "
                        "send valid Unicode text") from None
    return value


def _content(content, where: str) -> str:
    """Message content as text: a string, or the texts of a list of text parts, one per line (as
    vLLM joins them)."""
    if isinstance(content, str):
        return check_text(content, where)
    if not isinstance(content, list):
        raise ChatError(f"{where} must be a string or a list of text parts, got {_kind(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or "text" not in part:
            raise ChatError(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                            f"(this chat takes text only), got {_kind(part)}")
        texts.append(check_text(part["text"], f"{where}[{j}].text"))
    return "\n".join(texts)


def conversation(message: str, history: list | None = None, system_prompt: str | None = "") -> list[dict]:
    """Chat messages for the checkpoint's chat template: the system prompt, the history (the shape
    in this module's docstring) and the new user message. Malformed input raises ``ChatError``."""
    message = check_text(message, "the message")
    if not message.strip():
        raise ChatError("Type a message first.")
    system_prompt = check_text("" if system_prompt is None else system_prompt, "the system prompt")
    history = [] if history is None else history
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages += check_messages(history, "history")
    messages.append({"role": "user", "content": message})
    return _check_total(messages)


def check_messages(messages: list, where: str = "messages") -> list[dict]:
    """``{role, content}`` messages with their content as text (``developer`` counts as ``system``);
    anything else raises ``ChatError`` naming the place."""
    if not isinstance(messages, list):
        raise ChatError(f"{where} must be a list of {{role, content}} messages, got {_kind(messages)}")
    if len(messages) > MAX_HISTORY:
        raise ChatError(f"{where} has {len(messages):,} messages; the limit is {MAX_HISTORY:,}: "
                        "start a new conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError(f"{where}[{i}] must be an object with 'role' and 'content', got {_kind(m)}")
        role = "system" if m["role"] == "developer" else m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise ChatError(f"{where}[{i}].role must be 'user', 'assistant' or 'system', got {_kind(m['role'])}")
        out.append({"role": role, "content": _content(m["content"], f"{where}[{i}].content")})
    return _check_total(out)


def _check_total(messages: list[dict]) -> list[dict]:
    total = sum(len(m["content"]) for m in messages)
    if total > MAX_CHARS:
        raise ChatError(f"the conversation is {total:,} characters long; the limit is {MAX_CHARS:,}: "
                        "shorten it or start a new conversation")
    return messages


def _number(value, name: str, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ChatError(f"{name} must be a finite number, got {_kind(value)}")
    if integer and value != int(value):
        raise ChatError(f"{name} must be a whole number, got {value}")
    return int(value) if integer else float(value)


def sampling(temperature=0.7, top_p=0.95, top_k=0, max_new_tokens=256) -> SamplingParams:
    """Sampling parameters from the page's sliders or an API call (numbers; whole numbers for
    ``top_k`` and ``max_new_tokens``); a bad value raises ``ChatError``."""
    try:
        return SamplingParams(temperature=_number(temperature, "temperature"), top_p=_number(top_p, "top_p"),
                              top_k=_number(top_k, "top_k", integer=True),
                              max_new_tokens=_number(max_new_tokens, "max_new_tokens", integer=True))
    except ValueError as e:
        raise ChatError(str(e)) from None


def stream_reply(llm, message: str, history: list | None = None, system_prompt: str | None = "",
                 temperature: float = 0.7, top_p: float = 0.95, top_k: int = 0,
                 max_new_tokens: int = 256) -> Iterator[str]:
    """Yields the reply so far as it streams. Closing the generator (the stop button, a client
    that goes away) cancels the request in the cluster."""
    messages = conversation(message, history, system_prompt)
    params = sampling(temperature, top_p, top_k, max_new_tokens)
    try:
        request_id = llm.submit(messages, params)
    except (ValueError, ClusterUnavailable) as e:  # a bad request, or a cluster that cannot serve now
        raise ChatError(str(e)) from None
    reply, done = "", False
    try:
        for event in llm.stream(request_id):
            reply += event.text
            if event.finished:
                done = True
                if event.result.error:
                    raise ChatError(f"The request failed: {event.result.error}")
            yield reply
    finally:
        if not done:
            llm.cancel(request_id)

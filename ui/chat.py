"""The chat logic behind the page and the ``chat`` API endpoint (no Gradio imports here)."""

from __future__ import annotations

from collections.abc import Iterator

from model.sampling import SamplingParams


class ChatError(Exception):
    """A message for the person in the page (the UI shows it instead of a stack trace)."""


def _text(content) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or content.get("content") or ""
    if isinstance(content, list):
        return "".join(_text(part) for part in content)
    return "" if content is None else str(content)


def conversation(message: str, history: list, system_prompt: str = "") -> list[dict]:
    """Chat messages for the checkpoint's chat template from a Gradio history (``messages`` format)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    for m in history or []:
        if isinstance(m, dict) and m.get("role") in ("user", "assistant"):
            messages.append({"role": m["role"], "content": _text(m.get("content"))})
    messages.append({"role": "user", "content": message})
    return messages


def stream_reply(llm, message: str, history: list, system_prompt: str = "", temperature: float = 0.7,
                 top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 256) -> Iterator[str]:
    """Yields the reply so far as it streams. Closing the generator (the stop button, a client
    that goes away) cancels the request in the cluster."""
    if not message or not message.strip():
        raise ChatError("Type a message first.")
    try:
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                max_new_tokens=int(max_new_tokens))
        request_id = llm.submit(conversation(message, history, system_prompt), params)
    except ValueError as e:
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

"""The checkpoint's tokenizer: ``tokenizer.json`` + ``tokenizer_config.json`` (chat template).

Uses the ``tokenizers`` library directly and renders the chat template with a sandboxed Jinja
environment, as Hugging Face does, so no transformers import is needed at run time.

Control tokens (the tokenizer's added tokens: ``<｜User｜>``, ``<｜end▁of▁sentence｜>``, ...) in a chat
come from the chat template only. A message whose content holds such a string gets it as text,
so a client cannot forge turns: the string is swapped for an escape (U+E000, its index, U+E001:
private-use characters) before rendering, and the escape is encoded afterwards with the model's vocabulary
alone, e.g. ``<｜User｜>`` in a user message becomes the tokens of ``<``, ``｜``, ``User``, ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

_ESCAPE_OPEN, _ESCAPE_CLOSE = "\ue000", "\ue001"
_ESCAPE = re.compile(f"{_ESCAPE_OPEN}(\\d+){_ESCAPE_CLOSE}")
REASONING_MARKERS = ("<think>", "</think>")  # kept in assistant turns (``Tokenizer._escape_message``)


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet: each byte is written as one printable character (printable
    Latin-1 bytes as themselves, the other bytes as the characters from U+0100 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_chars()  # byte-level BPE character -> the byte it stands for


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict):
        self._tok = tokenizer
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = bool(config.get("add_bos_token", True)) and self.bos_token_id is not None
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self._compiled = None
        added = tokenizer.get_added_tokens_decoder()
        # ids that decode to nothing when special tokens are skipped
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_ids = frozenset(added)
        # longest first, so that a token holding another is taken whole
        self._added = sorted({t.content for t in added.values()} | {_ESCAPE_OPEN, _ESCAPE_CLOSE}, key=len,
                             reverse=True)
        self._byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: the checkpoint folder needs a tokenizer.json")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        return cls(HFTokenizer.from_file(str(file)), config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's own bytes: for a token that holds part of a UTF-8 character, those bytes
        (decoding it alone gives U+FFFD). Byte-level vocabularies map back exactly; others, and
        added tokens, give the UTF-8 of their text."""
        out = []
        for i in ids:
            piece = None if i in self._added_ids else self._tok.id_to_token(i)
            if self._byte_level and piece is not None and all(c in _BYTE_OF for c in piece):
                out.append(bytes(_BYTE_OF[c] for c in piece))
            else:
                out.append(self.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template in tokenizer_config.json; send a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered by the chat template (which writes its own BOS).
        Added-token strings inside message content are encoded as text, never as control tokens."""
        literals: list[str] = []
        escaped = [self._escape_message(m, literals) for m in messages]
        text = self.apply_chat_template(escaped, add_generation_prompt)
        if not literals:
            return self.encode(text, add_bos=False)
        ids, plain = [], ""
        for i, part in enumerate(_ESCAPE.split(text)):  # template text, literal index, template text, ...
            if i % 2:
                plain += literals[int(part)]
            elif part:
                ids += self._plain_ids(plain) + self._tok.encode(part, add_special_tokens=False).ids
                plain = ""
        return ids + self._plain_ids(plain)

    def _escape_message(self, message, literals: list[str]):
        """The message with every added-token string in its content (a string, or the ``text`` of
        content parts) replaced by an escape that points into ``literals``; in an assistant message,
        ``REASONING_MARKERS`` excepted."""
        if not isinstance(message, dict):
            return message  # apply_chat_template names the problem

        def keep(match: re.Match) -> str:
            literals.append(match.group())
            return f"{_ESCAPE_OPEN}{len(literals) - 1}{_ESCAPE_CLOSE}"

        # an assistant turn's reasoning markers stay themselves: DeepSeek's templates look for
        # "</think>" in earlier answers to drop the reasoning before it (as transformers renders them)
        kept = REASONING_MARKERS if message.get("role") == "assistant" else ()

        def escape(text):
            found = [t for t in self._added if t in text and t not in kept] if isinstance(text, str) else []
            return re.sub("|".join(map(re.escape, found)), keep, text) if found else text

        content = message.get("content")
        if isinstance(content, list):
            content = [{**part, "text": escape(part["text"])} if isinstance(part, dict) and "text" in part else part
                       for part in content]
        else:
            content = escape(content)
        return {**message, "content": content} if "content" in message else message

    def _plain_ids(self, text: str) -> list[int]:
        """Ids of ``text`` from the model's vocabulary alone (normalizer, pre-tokenizer, model), so
        no added token can match: what ``encode`` gives for text that holds none."""
        if not text:
            return []
        if self._tok.normalizer is not None:
            text = self._tok.normalizer.normalize_str(text)
        pieces = self._tok.pre_tokenizer.pre_tokenize_str(text) if self._tok.pre_tokenizer else [(text, None)]
        return [t.id for piece, _ in pieces for t in self._tok.model.tokenize(piece)]


def encode_prompt(tokenizer: Tokenizer | None, prompt: str | list[int] | list[dict], vocab_size: int) -> list[int]:
    """Token ids for a text prompt, a list of token ids, or a list of chat messages (rendered by the
    checkpoint's chat template). Ids outside the vocabulary and text without a tokenizer are errors."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json; pass token ids instead of text")
        return tokenizer.encode(prompt) if isinstance(prompt, str) else tokenizer.encode_chat(prompt)
    ids = [int(t) for t in prompt]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")
    return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    Text that ends in an incomplete byte sequence (decoded as U+FFFD) is held back until the
    next token completes it. Each step decodes a short window, not the whole output: the ids since
    the previous piece's start (``ids[prefix:]``) against the same window without the new ones
    (``ids[prefix:read]``); the piece is the difference. Both decodes begin at the same token, so
    whatever a decoder does at the start of a text (dropping a leading space) cancels out.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self._prefix = self._read = 0  # ids[_prefix:_read]: the last piece's tokens, context for the next

    def add(self, token_id: int) -> str:
        if self.skip and token_id in self.tokenizer.special_ids:
            return ""  # decodes to nothing: kept out of the window (a long run would grow it)
        self.ids.append(token_id)
        return self._piece(final=False)

    def flush(self) -> str:
        """Whatever is left, an incomplete character included (the output has ended)."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], self.skip)
        now = self.tokenizer.decode(self.ids[self._prefix:], self.skip)
        if not now.startswith(before):  # a decoder that rewrites earlier text: resynchronise on the whole
            now = self.tokenizer.decode(self.ids, self.skip)
            piece = now[len(self.text):] if now.startswith(self.text) else ""
            self.text, self._prefix, self._read = now, len(self.ids), len(self.ids)
            return piece
        # a character is at most 4 bytes: a replacement character 4 tokens on is in the output for good
        incomplete = now.endswith("\ufffd") and len(self.ids) - self._read < 4
        if len(now) <= len(before) or (incomplete and not final):
            return ""
        piece = now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

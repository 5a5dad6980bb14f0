"""Writing tiny random checkpoints in exactly the Hugging Face DeepSeek layout.

No weights can be downloaded on the project's machines, so tests and the default demo use a
checkpoint written here: ``config.json``, sharded ``*.safetensors`` with an index, and a real
byte-level BPE tokenizer (trained with ``tokenizers`` on a small built-in corpus) with a
DeepSeek-V3-style chat template. ``fp8=True`` writes block-FP8 weights with float32
``*_scale_inv`` the way DeepSeek's FP8 checkpoints do. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelArgs, QuantArgs, args_to_hf, raymoe_home
from model.indexer import LayerNorm
from model.layers import Linear, RMSNorm

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, "<｜pad｜>"]

CHAT_TEMPLATE = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] != 'system' %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

_WORDS = (
    "the of and to in is that it for on with as was at by be this are from or have an they which one you "
    "were all we there can has more when will would who what so up out if about into than them then some "
    "time two way could first after other many may these over only new very also any most like people how "
    "expert experts model models token tokens attention latent cache router layer layers cluster actor "
    "actors shard shards batch request requests stream streaming decode prefill sample sampling greedy "
    "temperature probability logits softmax sigmoid weight weights matrix vector tensor gradient kernel "
    "memory bandwidth throughput latency hello world question answer chat user assistant system please "
    "thanks good great small large fast slow number numbers table chair river mountain city music book "
    "café naïve résumé 日本語 中文 한국어 привет мир 🙂 🚀 ✓ → ∑ π"
).split()


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ",", ":"]))
        if i % 50 == 0:
            out.append(f"def f{i}(x):\n    return x * {i} + 1\n")
    return out


def train_tokenizer(vocab_size: int, seed: int = 0, texts=None):
    """A byte-level BPE over ``texts`` (default: a small built-in corpus drawn with ``seed``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(seed) if texts is None else texts, trainer)
    # BOS in front of every encoding, as DeepSeek's tokenizers do with add_special_tokens
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def quantize_weight(w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str | None = None):
    """Block-quantise a float weight [out, in] to FP8 with float32 ``scale_inv`` [ceil(out/bo), ceil(in/bi)]."""
    bo, bi = block
    out_f, in_f = w.shape
    rows, cols = -(-out_f // bo), -(-in_f // bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=torch.float32)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(rows, bo, cols, bi)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0  # [rows, cols]
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).view(rows * bo, cols * bi)[:out_f, :in_f]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def random_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every tensor of the network (bf16, float32 gate bias)."""
    from model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("weight_scale_inv"):
            continue
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        if isinstance(owner, (RMSNorm, LayerNorm)) and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            t = 0.05 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(p.shape, generator=gen)
        elif "embed_tokens" in name:
            t = torch.randn(p.shape, generator=gen)
        elif name.endswith("lm_head.weight") or name.endswith("shared_head.head.weight"):
            t = torch.randn(p.shape, generator=gen) * (3.0 / p.shape[1] ** 0.5)
        else:  # linear layers and the gate: unit-variance outputs for unit-variance inputs
            t = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
        state[name] = t.to(torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16)
    for name in _fp8_linears(args) if args.quant else []:
        state[name + ".weight"], state[name + ".weight_scale_inv"] = quantize_weight(
            state[name + ".weight"], args.quant.weight_block_size, args.quant.scale_fmt)
    return state


def skew_gate_bias(state: dict[str, torch.Tensor], hot_experts: int, hot_bias: float, seed: int) -> None:
    """Add ``hot_bias`` to the gate correction bias of ``hot_experts`` experts per MoE layer (in place)."""
    gen = torch.Generator().manual_seed(seed + 1)
    biases = sorted(n for n in state if n.endswith("e_score_correction_bias"))
    if not biases:
        raise ValueError("hot_experts needs a gate with e_score_correction_bias (topk_method noaux_tc)")
    for name in biases:
        bias = state[name]
        if not 0 < hot_experts <= bias.numel():
            raise ValueError(f"hot_experts must be in 1..{bias.numel()}, got {hot_experts}")
        hot = torch.randperm(bias.numel(), generator=gen)[:hot_experts]
        bias[hot] += hot_bias


def make_tiny(out: str | Path, preset: str = "tiny", fp8: bool = False, seed: int = 0,
              num_shards: int = 2, hot_experts: int = 0, hot_bias: float = 1.0, **overrides) -> Path:
    """Write a random checkpoint for ``preset`` (``configs/models/NAME.json``) to ``out``.

    ``hot_experts``: in every MoE layer, that many experts (a seeded choice per layer) get ``hot_bias``
    added to their gate's correction bias, so routing favours them: a skewed workload for balancing."""
    args = ModelArgs.from_preset(preset)
    tok = train_tokenizer(args.vocab_size, seed)
    args = args.replace(vocab_size=tok.get_vocab_size(), bos_token_id=tok.token_to_id(BOS),
                        eos_token_id=tok.token_to_id(EOS), **overrides)
    if fp8:
        args = args.replace(quant=QuantArgs())
    state = random_state_dict(args, seed)
    if hot_experts:
        skew_gate_bias(state, hot_experts, hot_bias, seed)

    return write_checkpoint(out, args, state, tok, num_shards)


def write_checkpoint(out: str | Path, args: ModelArgs, state: dict[str, torch.Tensor], tok,
                     num_shards: int = 1) -> Path:
    """Write ``state`` (tensor names as in the Hugging Face checkpoint) with its config, tokenizer
    (a ``tokenizers.Tokenizer``) and chat template to ``out`` in the Hugging Face layout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    shards = [names[i::num_shards] for i in range(num_shards)] if num_shards > 1 else [names]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in shard}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(args_to_hf(args), indent=2))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "clean_up_tokenization_spaces": False, "model_max_length": args.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "do_sample": False}, indent=2))
    return out


PACKAGED = Path(__file__).resolve().parent / "weights" / "shakespeare"


def default_checkpoint(fp8: bool = False) -> Path:
    """The project's default model: the tiny DeepSeek-V3 trained on Shakespeare's plays that ships in
    ``model/weights/shakespeare`` (``model/train.py`` made it). ``fp8``: its block-FP8 copy, written on
    first use under ``$RAYMOE_HOME`` (default ``~/.cache/raymoe``)."""
    if not (PACKAGED / "config.json").exists():
        raise FileNotFoundError(f"the default checkpoint is missing from {PACKAGED}; reinstall raymoe or "
                                f"train one with `raymoe train-tiny --out {PACKAGED}` (or write a random one with "
                                "`raymoe make-tiny`)")
    if not fp8:
        return PACKAGED
    import shutil

    path = raymoe_home() / "checkpoints" / "shakespeare-fp8"
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + ".partial")
        quantize_checkpoint(PACKAGED, tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    return path


def quantize_checkpoint(src: str | Path, out: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """A block-FP8 copy of the float checkpoint ``src`` (every weight DeepSeek quantises, with its
    ``weight_scale_inv``), tokenizer and all, in ``out``."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    src = Path(src)
    args = ModelArgs.from_hf(src).replace(quant=QuantArgs(weight_block_size=block))
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for name in _fp8_linears(args):
        state[name + ".weight"], state[name + ".weight_scale_inv"] = quantize_weight(
            state[name + ".weight"], block, args.quant.scale_fmt)
    out = write_checkpoint(out, args, state, Tokenizer.from_file(str(src / "tokenizer.json")))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return Path(out)


def _fp8_linears(args: ModelArgs) -> list[str]:
    """Names of the linear layers that are block-FP8 in a checkpoint with ``args.quant``."""
    from model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args, torch.bfloat16)
    return sorted(n for n, m in model.named_modules() if isinstance(m, Linear) and m.fp8_block is not None)

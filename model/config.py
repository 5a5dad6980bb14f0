"""Model configuration: one frozen dataclass built from a Hugging Face ``config.json``.

``ModelArgs.from_hf`` is the only place that knows the Hugging Face key names (DeepSeek's own
``rope_scaling`` form and transformers 5's ``rope_parameters`` form alike); everything else in
the project reads ``ModelArgs`` fields, which keep the checkpoint's names.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "linear", "yarn")
# transformers' config classes' values for keys a config.json may leave out (a key given as null
# means "none": no shared experts, no groups, scaling 1)
HF_DEFAULTS = {
    "deepseek_v2": dict(n_shared_experts=2, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                        first_k_dense_replace=0),
    "deepseek_v3": dict(n_shared_experts=1, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                        first_k_dense_replace=3),
}
HF_DEFAULTS["deepseek_v32"] = dict(HF_DEFAULTS["deepseek_v3"], index_n_heads=64, index_head_dim=128, index_topk=2048)
NULL_MEANS = dict(n_shared_experts=0, routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=0,
                  index_n_heads=0, index_head_dim=0, index_topk=0)

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def raymoe_home() -> Path:
    """Where raymoe keeps what it makes on first use (data, converted checkpoints):
    ``$RAYMOE_HOME``, default ``~/.cache/raymoe``."""
    return Path(os.environ.get("RAYMOE_HOME", Path.home() / ".cache" / "raymoe"))


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding parameters; ``type`` "yarn" (YaRN) or "linear" (positions / factor) scales them."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # YaRN's cos/sin multiplier when the config gives it (transformers)

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.type {self.type!r} is not supported; use one of {ROPE_TYPES} "
                "(DeepSeek checkpoints use 'yarn')"
            )
        if self.type != "default" and self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class QuantArgs:
    """Block FP8 quantisation of a checkpoint (``quantization_config``)."""

    weight_block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None  # "ue8m0": scales rounded to powers of two (V3.1+)

    def __post_init__(self):
        if tuple(self.weight_block_size) != (128, 128):
            raise ValueError(
                f"quantization_config.weight_block_size {list(self.weight_block_size)} is not supported; "
                "raymoe's FP8 kernels use [128, 128] blocks, as DeepSeek's checkpoints do"
            )
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"quantization_config.scale_fmt {self.scale_fmt!r} is not supported; use ue8m0 or omit it")


@dataclass(frozen=True)
class ModelArgs:
    """The DeepSeek-V2/V3 network's hyper-parameters, named as in ``config.json``."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_attention_heads: int = 128
    q_lora_rank: int = 1536  # 0: plain q_proj, no norm
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope: RopeArgs = field(default_factory=RopeArgs)
    num_nextn_predict_layers: int = 0
    quant: QuantArgs | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # DeepSeek-V3.2 lightning indexer (sparse attention)
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    # a runtime choice, not a config.json key: score the indexer as DeepSeek's kernels do (Hadamard-rotated
    # q and k quantised to FP8 in 1x128 blocks, keys cached in FP8 with their scales) instead of in float
    index_fp8: bool = False

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; use one of {MODEL_TYPES}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported; use one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method {self.topk_method!r} is not supported; use one of {TOPK_METHODS}")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "moe_layer_freq"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok must be in 1..n_routed_experts ({self.n_routed_experts}), "
                    f"got {self.num_experts_per_tok}"
                )
            if self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
                )
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group must be in 1..n_group ({self.n_group}), got {self.topk_group}")
            if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
                raise ValueError(
                    "topk_group groups hold fewer experts than num_experts_per_tok; raise topk_group"
                )
        if self.first_k_dense_replace < 0:
            raise ValueError(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")

    # derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_fp8(self) -> bool:
        return self.quant is not None

    @property
    def softmax_scale(self) -> float:
        """``(qk_nope+qk_rope)^-0.5``, times ``m(mscale_all_dim)^2`` under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # construction
    @classmethod
    def from_hf(cls, cfg: dict[str, Any] | str | Path) -> ModelArgs:
        """Build from a ``config.json`` dict, a path to one, or a checkpoint folder."""
        if not isinstance(cfg, dict):
            path = Path(cfg)
            if path.is_dir():
                path = path / "config.json"
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: a checkpoint folder needs a config.json")
            cfg = read_json_object(path)
        return _from_hf_dict(cfg)

    @classmethod
    def from_preset(cls, name: str) -> ModelArgs:
        """A preset from ``configs/models/NAME.json``."""
        path = CONFIGS_DIR / "models" / f"{name}.json"
        if not path.exists():
            known = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.json"))
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
        return cls.from_hf(path)

    def replace(self, **changes) -> ModelArgs:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelArgs(**values)


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """What the checkpoint's ``generation_config.json`` says about sampling, as vLLM applies it to
    requests that leave a value out: ``temperature``, ``top_p``, ``top_k`` where it sets them (in
    range), and ``eos_token_ids``, every id it gives (an id or a list). A missing or unreadable file
    sets nothing."""
    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = read_json_object(path) if path.exists() else {}
    except ValueError:
        return {}
    out: dict[str, Any] = {}
    for key, ok in (("temperature", lambda v: 0 <= v <= 2), ("top_p", lambda v: 0 < v <= 1),
                    ("top_k", lambda v: v >= -1 and float(v).is_integer())):
        value = cfg.get(key)
        if type(value) in (int, float) and math.isfinite(value) and ok(value):
            out[key] = int(value) if key == "top_k" else float(value)
    eos = cfg.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if ids and all(type(i) is int and i >= 0 for i in ids):
        out["eos_token_ids"] = ids
    return out


def end_of_sequence_ids(tokenizer, args: ModelArgs, defaults: dict[str, Any]) -> tuple[int, ...]:
    """The ids that end a sequence: the tokenizer's eos id (else config.json's) and every one
    ``generation_config.json`` lists (``defaults``: ``generation_defaults``), as transformers'
    ``generate`` and vLLM stop on them."""
    primary = tokenizer.eos_token_id if tokenizer and tokenizer.eos_token_id is not None else args.eos_token_id
    ids = [] if primary is None else [primary]
    return tuple(ids + [i for i in defaults.get("eos_token_ids", []) if i not in ids])


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; anything else is a ``ValueError`` naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix or "
                         "re-download it") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text; fix or re-download it") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {_json_type(value)}")
    return value


# Typed reads of config.json values. ``None`` (JSON null) counts as absent: optional keys take their
# default, required ones (no default) fail. Errors name the key, the value and the type wanted.

_REQUIRED: Any = object()


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _bad(key: str, value, where: str, wanted: str) -> ValueError:
    return ValueError(f"config.json: {where}{key} must be {wanted}, got {value!r}")


def _get(obj: dict[str, Any], key: str, default, where: str, wanted: str, valid) -> Any:
    value = obj.get(key)
    if value is None:
        if default is not _REQUIRED:
            return default
        if key in obj:
            raise ValueError(f"config.json: {where}{key} must be {wanted}, got null")
        raise ValueError(f"config.json: {where}{key} is required but missing; it must be {wanted}")
    if not valid(value):
        raise _bad(key, value, where, wanted)
    return value


def _int(obj: dict[str, Any], key: str, default=_REQUIRED, where: str = "") -> int:
    # bool is a subclass of int, hence ``type(v) is``; 4096.0 is harmless
    return int(_get(obj, key, default, where, "an integer",
                    lambda v: type(v) is int or (type(v) is float and v.is_integer())))


def _float(obj: dict[str, Any], key: str, default=_REQUIRED, where: str = "") -> float:
    return float(_get(obj, key, default, where, "a number",
                      lambda v: type(v) in (int, float) and math.isfinite(v)))


def _bool(obj: dict[str, Any], key: str, default=_REQUIRED, where: str = "") -> bool:
    return _get(obj, key, default, where, "true or false", lambda v: type(v) is bool)


def _str(obj: dict[str, Any], key: str, default=_REQUIRED, where: str = "") -> str:
    return _get(obj, key, default, where, "a string", lambda v: type(v) is str)


def _token_id(cfg: dict[str, Any], key: str) -> int | None:
    """``bos_token_id`` / ``eos_token_id``: an id, null, or a list whose first id is used."""
    value = cfg.get(key)
    first = (value[0] if value else None) if isinstance(value, list) else value
    if first is not None and type(first) is not int:
        raise _bad(key, value, "", "an integer, a list of integers or null")
    return first


def _from_hf_dict(cfg: dict[str, Any]) -> ModelArgs:
    model_type = _str(cfg, "model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} in config.json is not supported; raymoe serves {MODEL_TYPES}"
        )
    v2 = model_type == "deepseek_v2"

    def hf_default(key: str):  # absent: the config class's value; null: "none"
        return NULL_MEANS[key] if key in cfg else HF_DEFAULTS[model_type].get(key, NULL_MEANS[key])

    if _bool(cfg, "mlp_bias", False):
        raise ValueError("mlp_bias true is not supported: raymoe's MLPs and experts have no biases (no DeepSeek "
                         "checkpoint has them)")
    topk_method = _str(cfg, "topk_method", "greedy" if v2 else "noaux_tc")
    if topk_method == "gready":  # the spelling some DeepSeek-V2 configs carry
        topk_method = "greedy"
    hidden_act = _str(cfg, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; DeepSeek models use 'silu'")
    if not _bool(cfg, "rope_interleave", True):
        raise ValueError("rope_interleave false is not supported; DeepSeek checkpoints rotate interleaved pairs")
    n_routed = _int(cfg, "n_routed_experts", 0)
    return ModelArgs(
        model_type=model_type,
        vocab_size=_int(cfg, "vocab_size"),
        hidden_size=_int(cfg, "hidden_size"),
        intermediate_size=_int(cfg, "intermediate_size"),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size", 0),
        num_hidden_layers=_int(cfg, "num_hidden_layers"),
        first_k_dense_replace=_int(cfg, "first_k_dense_replace", hf_default("first_k_dense_replace")),
        moe_layer_freq=_int(cfg, "moe_layer_freq", 1),
        n_routed_experts=n_routed,
        n_shared_experts=_int(cfg, "n_shared_experts", hf_default("n_shared_experts")),
        num_experts_per_tok=_int(cfg, "num_experts_per_tok", 1 if not n_routed else 0),
        n_group=_int(cfg, "n_group", hf_default("n_group")),
        topk_group=_int(cfg, "topk_group", hf_default("topk_group")),
        routed_scaling_factor=_float(cfg, "routed_scaling_factor", hf_default("routed_scaling_factor")),
        scoring_func=_str(cfg, "scoring_func", "softmax" if v2 else "sigmoid"),
        topk_method=topk_method,
        norm_topk_prob=_bool(cfg, "norm_topk_prob", not v2),
        num_attention_heads=_int(cfg, "num_attention_heads"),
        q_lora_rank=_int(cfg, "q_lora_rank", 0),
        kv_lora_rank=_int(cfg, "kv_lora_rank"),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=_int(cfg, "qk_rope_head_dim"),
        v_head_dim=_int(cfg, "v_head_dim"),
        attention_bias=_bool(cfg, "attention_bias", False),
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
        max_position_embeddings=_int(cfg, "max_position_embeddings", 4096),
        rope=_rope_from_hf(cfg),
        num_nextn_predict_layers=_int(cfg, "num_nextn_predict_layers", 0),
        quant=_quant_from_hf(cfg.get("quantization_config")),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", False),
        bos_token_id=_token_id(cfg, "bos_token_id"),
        eos_token_id=_token_id(cfg, "eos_token_id"),
        index_n_heads=_int(cfg, "index_n_heads", hf_default("index_n_heads")),
        index_head_dim=_int(cfg, "index_head_dim", hf_default("index_head_dim")),
        index_topk=_int(cfg, "index_topk", hf_default("index_topk")),
    )


def _rope_from_hf(cfg: dict[str, Any]) -> RopeArgs:
    # DeepSeek's own configs: rope_theta + rope_scaling; transformers 5: rope_parameters (theta inside)
    where = "rope_parameters." if cfg.get("rope_parameters") else "rope_scaling."
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ValueError(f"config.json: {where[:-1]} must be a JSON object, got {scaling!r}")
    if "rope_theta" in scaling:
        theta = _float(scaling, "rope_theta", 10000.0, where)
    else:
        theta = _float(cfg, "rope_theta", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return RopeArgs(theta=theta)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; use 'yarn', 'linear' or none")
    if scaling.get("factor") is None:
        raise ValueError(f"config.json: {where}factor is required for {rope_type} scaling")
    if rope_type == "linear":
        return RopeArgs(theta=theta, type="linear", factor=_float(scaling, "factor", where=where))

    def unset_if_zero(key: str, default: float) -> float:  # 0 reads as unset, as in transformers' yarn
        return _float(scaling, key, default, where) or default

    return RopeArgs(
        theta=theta,
        type="yarn",
        factor=_float(scaling, "factor", where=where),
        # as transformers: the model's max_position_embeddings when the scaling does not say
        original_max_position_embeddings=_int(scaling, "original_max_position_embeddings",
                                              _int(cfg, "max_position_embeddings", 4096), where),
        beta_fast=unset_if_zero("beta_fast", 32.0),
        beta_slow=unset_if_zero("beta_slow", 1.0),
        mscale=unset_if_zero("mscale", 1.0),
        mscale_all_dim=_float(scaling, "mscale_all_dim", 0.0, where),
        attention_factor=None if scaling.get("attention_factor") is None else _float(scaling, "attention_factor",
                                                                                     where=where),
    )


def _quant_from_hf(qc: Any) -> QuantArgs | None:
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"config.json: quantization_config must be a JSON object, got {qc!r}")
    where = "quantization_config."
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported; raymoe reads 'fp8'")
    fmt = _str(qc, "fmt", "e4m3", where)
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported; use e4m3")
    block = qc.get("weight_block_size") or [128, 128]
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(type(b) is int for b in block)):
        raise _bad("weight_block_size", block, where, "[rows, cols] (two integers)")
    scale_fmt = _str(qc, "scale_fmt", None, where)
    return QuantArgs(weight_block_size=(block[0], block[1]), scale_fmt=scale_fmt)


def args_to_hf(args: ModelArgs) -> dict[str, Any]:
    """The ``config.json`` dict (DeepSeek's own ``rope_scaling`` form) for these arguments."""
    cfg: dict[str, Any] = {
        "architectures": [
            {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
             "deepseek_v32": "DeepseekV32ForCausalLM"}[args.model_type]
        ],
    }
    for f in fields(args):
        if f.name in ("rope", "quant"):
            continue
        cfg[f.name] = getattr(args, f.name)
    cfg["q_lora_rank"] = args.q_lora_rank or None
    cfg["hidden_act"] = "silu"
    cfg["rope_theta"] = args.rope.theta
    if args.rope.type == "yarn":
        r = args.rope
        cfg["rope_scaling"] = {
            "type": "yarn", "factor": r.factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
            "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
            "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim,
        }
        if r.attention_factor is not None:
            cfg["rope_scaling"]["attention_factor"] = r.attention_factor
    elif args.rope.type == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": args.rope.factor}
    if args.quant is not None:
        cfg["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(args.quant.weight_block_size),
        }
        if args.quant.scale_fmt:
            cfg["quantization_config"]["scale_fmt"] = args.quant.scale_fmt
    if args.model_type != "deepseek_v32":
        for key in ("index_n_heads", "index_head_dim", "index_topk"):
            cfg.pop(key)
    cfg["torch_dtype"] = "bfloat16"
    return cfg

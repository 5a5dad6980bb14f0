"""The cluster layout: how many actors of each role, where they go, and what they may use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from model.config import CONFIGS_DIR

DEFAULT_LAYOUT = CONFIGS_DIR / "cluster" / "local.yaml"
STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")

_is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_is_number = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
_is_str = lambda v: isinstance(v, str)


def _is_mapping(value, key_ok, value_ok) -> bool:
    return isinstance(value, dict) and all(key_ok(k) and value_ok(v) for k, v in value.items())


# a field's annotation (a string: annotations are postponed) -> (test, what is wanted)
_TYPES = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (_is_str, "a string"),
    "dict[str, dict[str, float]]": (
        lambda v: _is_mapping(v, _is_str, lambda r: _is_mapping(r, _is_str, lambda n: _is_number(n) and n >= 0)),
        "a mapping of role: {resource name: amount >= 0}"),
    "dict[int, int]": (lambda v: _is_mapping(v, lambda k: _is_int(k) and k >= 0, lambda n: _is_int(n) and n >= 1),
                       "a mapping of expert id (>= 0): extra copies (an integer >= 1)"),
    "dict[str, float] | None": (lambda v: v is None or _is_mapping(v, _is_str, _is_number),
                                "a mapping of name: number (absent: off)"),
}


@dataclass(frozen=True)
class ClusterLayout:
    attention_shards: int = 1
    expert_actors: int = 2
    spare_slots: int = 2
    device: str = "cpu"
    dtype: str = "bfloat16"
    num_cpus_per_actor: float = 0.5
    torch_threads: int = 1
    block_size: int = 16
    num_blocks: int = 512
    max_batch_tokens: int = 512
    max_running: int = 64
    collective_timeout_s: float = 120.0
    # gloo with every actor on one host: rows travel over named pipes (one write per message) rather than
    # loopback TCP (``actors.pipes``); False: always gloo
    local_pipes: bool = True
    startup_timeout_s: float = 1800.0  # actors loading their weights and joining the process group
    placement_strategy: str = "SPREAD"
    resources: dict[str, dict[str, float]] = field(default_factory=dict)
    replicas: dict[int, int] = field(default_factory=dict)
    index_fp8: bool = False  # DeepSeek-V3.2: score the indexer in FP8 (as DeepSeek's kernels) instead of float
    # MTP speculative decoding: drafts per step for requests that do not say (0: off, the MTP layer is not loaded)
    speculative_tokens: int = 0
    # model steps per actor call while every sequence decodes (fewer Ray round trips; 1: one per call)
    decode_steps: int = 1
    # 2: each attention shard splits its batch in two micro-batches and computes one's attention while the
    # other's routed rows are at the expert actors (1: one batch, attention and experts take turns)
    micro_batches: int = 1
    # {every_steps, window_steps, min_gain}: re-plan expert placement from the load (absent: off)
    balance: dict[str, float] | None = None
    # {min_expert_actors, max_expert_actors, scale_out_rows, scale_in_rows, window_steps, cooldown_steps}
    autoscale: dict[str, float] | None = None

    def __post_init__(self):
        for f in fields(self):
            test, wanted = _TYPES[f.type]
            if not test(getattr(self, f.name)):
                raise ValueError(f"layout: {f.name} must be {wanted}, got {getattr(self, f.name)!r}")
        for key in ("attention_shards", "expert_actors", "block_size", "num_blocks", "max_batch_tokens",
                    "max_running", "torch_threads", "decode_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"layout: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_cpus_per_actor", "collective_timeout_s", "startup_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"layout: {key} must be > 0, got {getattr(self, key)}")
        if self.micro_batches not in (1, 2):
            raise ValueError(f"layout: micro_batches must be 1 or 2, got {self.micro_batches}")
        if not 0 <= self.speculative_tokens <= 8:
            raise ValueError(f"layout: speculative_tokens must be in 0..8 (0: off), got {self.speculative_tokens}")
        if self.spare_slots < 0:
            raise ValueError(f"layout: spare_slots must be >= 0, got {self.spare_slots}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"layout: device {self.device!r} is not supported; use cpu or cuda")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"layout: dtype {self.dtype!r} is not supported; use bfloat16, float16 or float32")
        for key, policy in (("balance", "balance_policy"), ("autoscale", "autoscale_policy")):
            try:
                getattr(self, policy)
            except (TypeError, ValueError) as e:
                raise ValueError(f"layout: {key}: {str(e).removeprefix('layout: ')}") from None
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"layout: placement_strategy must be one of {STRATEGIES}, got {self.placement_strategy!r}")
        unknown_roles = set(self.resources) - {"attention", "expert", "router"}
        if unknown_roles:
            raise ValueError(f"layout: resources has unknown roles {sorted(unknown_roles)}; "
                             "use attention, expert, router")
        for role, res in self.resources.items():
            for name in res:
                if "_group_" in name:
                    raise ValueError(
                        f"layout: resource {name!r} ({role}) contains '_group_', which Ray takes for a "
                        "placement-group resource (the actor would never be scheduled); rename it"
                    )

    @property
    def balance_policy(self):
        from actors.router import BalancePolicy

        return None if self.balance is None else BalancePolicy(**self.balance)

    @property
    def autoscale_policy(self):
        from actors.router import AutoscalePolicy

        if self.autoscale is None:
            return None
        return AutoscalePolicy(**{"min_expert_actors": self.expert_actors, "max_expert_actors": self.expert_actors,
                                  **self.autoscale})

    @property
    def world_size(self) -> int:
        return self.attention_shards + self.expert_actors

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ClusterLayout:
        """From a YAML file (default ``configs/cluster/local.yaml``); ``None`` overrides are ignored.
        A bad value is a ``ValueError`` that starts ``layout <path>:``, or ``layout:`` when an override is at fault."""
        path = Path(path or DEFAULT_LAYOUT)
        data = _normalised(_read_mapping(path))
        overrides = _normalised({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        for where, values in ((f"layout {path}:", data), ("layout:", overrides)):
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"{where} unknown key(s) {sorted(unknown, key=str)}; known: {sorted(known)}")
        try:
            return cls(**{**data, **overrides})
        except ValueError:
            try:  # blame the file when it is bad without the overrides too (defaults for the keys they set)
                cls(**{k: v for k, v in data.items() if k not in overrides})
            except ValueError as e:
                raise ValueError(f"layout {path}: {str(e).removeprefix('layout: ')}") from None
            raise


def _read_mapping(path: Path) -> dict:
    """The top-level mapping of a layout file (empty file: ``{}``)."""
    try:
        with path.open() as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeError) as e:
        why = {FileNotFoundError: "layout file does not exist", IsADirectoryError: "is a directory, not a layout file",
               PermissionError: "layout file is not readable (permission denied)"}.get(type(e), f"cannot read it ({e})")
        raise ValueError(f"layout {path}: {why}; pass --layout a readable YAML file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"layout {path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"layout {path}: must be a mapping of layout keys (key: value lines), "
                         f"got {type(data).__name__} {data!r:.80}")
    return data or {}


def _normalised(values: dict) -> dict:
    """An empty ``resources:``/``replicas:`` is ``{}``; expert ids may be quoted (``"0": 1``)."""
    values = {k: {} if v is None and k in ("resources", "replicas") else v for k, v in values.items()}
    if isinstance(values.get("replicas"), dict):
        values["replicas"] = {int(k) if isinstance(k, str) and k.strip().isdigit() else k: n
                              for k, n in values["replicas"].items()}
    return values

"""The cluster layout: how many actors of each role, where they go, and what they may use."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from model.config import CONFIGS_DIR

DEFAULT_LAYOUT = CONFIGS_DIR / "cluster" / "local.yaml"
STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")


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
        for key in ("attention_shards", "expert_actors", "block_size", "num_blocks", "max_batch_tokens",
                    "max_running", "torch_threads", "decode_steps"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"layout: {key} must be >= 1, got {getattr(self, key)}")
        if self.micro_batches not in (1, 2):
            raise ValueError(f"layout: micro_batches must be 1 or 2, got {self.micro_batches}")
        if not 0 <= int(self.speculative_tokens) <= 8:
            raise ValueError(f"layout: speculative_tokens must be in 0..8 (0: off), got {self.speculative_tokens}")
        if self.spare_slots < 0:
            raise ValueError(f"layout: spare_slots must be >= 0, got {self.spare_slots}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"layout: device {self.device!r} is not supported; use cpu or cuda")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"layout: dtype {self.dtype!r} is not supported; use bfloat16, float16 or float32")
        for key, policy in (("balance", "balance_policy"), ("autoscale", "autoscale_policy")):
            value = getattr(self, key)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"layout: {key} must be a mapping, got {value!r}")
            try:
                getattr(self, policy)
            except TypeError as e:
                raise ValueError(f"layout: {key}: {e}") from None
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"layout: placement_strategy must be one of {STRATEGIES}")
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
        """From a YAML file (default ``configs/cluster/local.yaml``); ``None`` overrides are ignored."""
        data = yaml.safe_load(Path(path or DEFAULT_LAYOUT).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"layout: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["replicas"] = {int(k): int(v) for k, v in (data.get("replicas") or {}).items()}
        data["resources"] = dict(data.get("resources") or {})
        return cls(**data)

"""Expert banks: the routed experts' weights an expert actor holds, one bank per MoE layer.

A bank has ``num_slots`` physical slots; each holds one logical expert's weights or nothing (a spare
slot waiting for a replica). ``restaged`` builds the bank for a new placement, copying the experts
this actor already holds and reading only the others from the checkpoint (FP8 stays FP8).
"""

from __future__ import annotations

import torch

import kernels
from model.config import ModelArgs


class ExpertBank:
    """Routed experts' weights for a set of physical slots, stacked per projection: ``gate``/``up``
    [S, moe_inter, hidden] and ``down`` [S, hidden, moe_inter], float or FP8 with block scales.
    ``logical[slot]`` is the logical expert a slot holds (``None``: a spare slot, zeros)."""

    PROJ = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, logical: list[int | None], weights: dict[str, torch.Tensor],
                 scales: dict[str, torch.Tensor] | None = None):
        self.logical, self.weights, self.scales = list(logical), weights, scales

    @property
    def fp8(self) -> bool:
        return self.scales is not None

    @property
    def num_slots(self) -> int:
        return self.weights["gate_proj"].shape[0]

    @classmethod
    def empty(cls, num_slots: int, args: ModelArgs, dtype: torch.dtype, device: str | torch.device = "cpu"
              ) -> ExpertBank:
        fp8 = args.quant is not None
        shapes = {"gate_proj": (args.moe_intermediate_size, args.hidden_size),
                  "up_proj": (args.moe_intermediate_size, args.hidden_size),
                  "down_proj": (args.hidden_size, args.moe_intermediate_size)}
        w_dtype = torch.float8_e4m3fn if fp8 else dtype
        weights = {p: torch.zeros(num_slots, o, i, dtype=w_dtype, device=device) for p, (o, i) in shapes.items()}
        scales = {p: torch.zeros(num_slots, -(-o // 128), -(-i // 128), dtype=torch.float32, device=device)
                  for p, (o, i) in shapes.items()}
        return cls([None] * num_slots, weights, scales if fp8 else None)

    @classmethod
    def load(cls, reader, layer_id: int, logical: list[int | None], args: ModelArgs, dtype: torch.dtype,
             device: str | torch.device = "cpu") -> ExpertBank:
        """Read the experts ``logical[slot]`` of MoE layer ``layer_id`` (``None``: an empty spare slot)."""
        return cls.empty(len(logical), args, dtype, device).restaged(reader, layer_id, logical)[0]

    @property
    def device(self) -> torch.device:
        return self.weights["gate_proj"].device

    def restaged(self, reader, layer_id: int, logical: list[int | None]) -> tuple[ExpertBank, int]:
        """A new bank whose slots hold ``logical`` (its length may differ from this bank's): experts
        this bank holds are copied, the others are read from the checkpoint (only their tensors).
        Returns the bank and how many experts were read. This bank is left as it is (it keeps serving
        until the switch)."""
        here = {e: slot for slot, e in enumerate(self.logical) if e is not None}
        missing = sorted({e for e in logical if e is not None and e not in here})
        names = [f"model.layers.{layer_id}.mlp.experts.{e}.{p}.{kind}" for e in missing for p in self.PROJ
                 for kind in (("weight", "weight_scale_inv") if self.fp8 else ("weight",))]
        read = reader.read(names, device=self.device)
        n = len(logical)
        weights = {p: w.new_zeros((n, *w.shape[1:])) for p, w in self.weights.items()}
        scales = {p: s.new_zeros((n, *s.shape[1:])) for p, s in self.scales.items()} if self.fp8 else None
        for slot, e in enumerate(logical):
            for p in self.PROJ:
                if e is None:
                    continue
                if e in here:
                    weights[p][slot] = self.weights[p][here[e]]
                    if self.fp8:
                        scales[p][slot] = self.scales[p][here[e]]
                    continue
                base = f"model.layers.{layer_id}.mlp.experts.{e}.{p}."
                weights[p][slot] = read[base + "weight"].to(weights[p].dtype)
                if self.fp8:
                    scales[p][slot] = read[base + "weight_scale_inv"]
        return ExpertBank(logical, weights, scales), len(missing)

    def forward_sorted(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows sorted by slot (``offsets`` [S+1]) through their slot's SwiGLU expert -> [N, hidden]."""
        w = self.weights
        if self.fp8:
            s = self.scales
            return kernels.moe.swiglu_fp8_sorted(x, offsets, w["gate_proj"], s["gate_proj"], w["up_proj"],
                                                 s["up_proj"], w["down_proj"], s["down_proj"]).to(x.dtype)
        return kernels.moe.swiglu_sorted(x, offsets, w["gate_proj"], w["up_proj"], w["down_proj"])

    def forward_quantized(self, a: torch.Tensor, a_s: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``forward_sorted`` of an FP8 bank on rows quantised already (``act_quant``) -> [N, hidden] bf16."""
        w, s = self.weights, self.scales
        return kernels.moe.swiglu_fp8_quantized(a, a_s, offsets, w["gate_proj"], s["gate_proj"], w["up_proj"],
                                                s["up_proj"], w["down_proj"], s["down_proj"])

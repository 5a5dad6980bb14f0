"""ExpertActor: one expert group, a set of physical expert slots for every MoE layer.

Reads only the tensors of the experts its slots hold (FP8 with block scales where the checkpoint
has them) and serves the rows the attention shards send it, layer by layer, in lockstep.
"""

from __future__ import annotations

import ray
import torch

from actors.collective import GroupInfo, init_group, node_address
from actors.dispatch import Timer, serve_expert_layer
from actors.messages import ExpertStepOutput
from actors.placement import Placement
from model.checkpoint import CheckpointReader
from model.generate import DTYPES
from model.moe import ExpertBank


class ExpertGroup:
    def __init__(self, model_dir: str, actor_index: int, placement: Placement, dtype: str,
                 torch_threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(torch_threads)
        self.actor_index, self.device = actor_index, device
        self.dtype = DTYPES[dtype]
        reader = CheckpointReader(model_dir)
        self.args = reader.args
        self.slots = placement.slot_contents(actor_index)
        self.banks = {layer: ExpertBank.load(reader, layer, logical, self.args, self.dtype, device)
                      for layer, logical in self.slots.items()}
        self.timer = Timer()
        self.info: GroupInfo | None = None
        self.group = None
        self.rows_per_slot = {layer: [0] * placement.slots_per_actor for layer in self.slots}

    def address(self) -> tuple[str, int]:
        return node_address()

    def init_group(self, info: GroupInfo, master_addr: str, master_port: int, placement: Placement) -> bool:
        self.info = info
        self.group = init_group(info, master_addr, master_port)
        return True

    def slot_contents(self) -> dict[int, list[int | None]]:
        return self.slots

    def slot_load(self) -> dict[int, list[int]]:
        """Rows computed per physical slot and MoE layer since start."""
        return self.rows_per_slot

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @torch.inference_mode()
    def step(self) -> ExpertStepOutput:
        self.timer.seconds.clear()
        rows = []
        for layer in self.args.moe_layers:
            per_slot = serve_expert_layer(self.info, self.group, self.banks[layer], self.args.hidden_size,
                                          self.dtype, self.timer)
            self.rows_per_slot[layer] = [a + b for a, b in zip(self.rows_per_slot[layer], per_slot, strict=True)]
            rows.append(sum(per_slot))
        return ExpertStepOutput(rows, dict(self.timer.seconds))


@ray.remote
class ExpertActor(ExpertGroup):
    pass

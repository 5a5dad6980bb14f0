"""ExpertActor: one expert group, a set of physical expert slots for every MoE layer.

Reads only the tensors of the experts its slots hold (FP8 with block scales where the checkpoint
has them) and serves the rows the attention shards send it, layer by layer, in lockstep.

A new placement is applied in two moves: ``prepare`` builds the new banks in a background thread
(experts already here are copied, the others read from the checkpoint) while steps go on with the
old ones; the step told to ``switch_to`` that version swaps them in before it serves a row.
"""

from __future__ import annotations

import threading
import time

import ray
import torch

from actors.collective import GroupInfo, init_group, node_address, transport
from actors.dispatch import Timer, serve_expert_layer
from actors.expert_bank import ExpertBank
from actors.messages import ExpertStepOutput
from actors.placement import Placement
from model.checkpoint import CheckpointReader
from model.generate import DTYPES


class ExpertGroup:
    def __init__(self, model_dir: str, actor_index: int, placement: Placement, dtype: str,
                 torch_threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(torch_threads)
        self.actor_index, self.device = actor_index, device
        self.dtype = DTYPES[dtype]
        self.reader = CheckpointReader(model_dir)
        self.args = self.reader.args
        self.banks = {layer: ExpertBank.load(self.reader, layer, logical, self.args, self.dtype, device)
                      for layer, logical in placement.slot_contents(actor_index).items()}
        self.version = placement.version
        self.timer = Timer()
        self.info: GroupInfo | None = None
        self.group = None
        self.rows_total = 0
        self.rows_per_slot = {layer: [0] * bank.num_slots for layer, bank in self.banks.items()}
        self._staged: tuple[int, dict[int, ExpertBank], dict] | None = None  # version, banks, figures
        self._stage_error: str | None = None
        self._staging: threading.Thread | None = None

    def address(self) -> tuple[str, int]:
        return node_address()

    def init_group(self, info: GroupInfo, master_addr: str, master_port: int, placement: Placement) -> str:
        """Join the (new) process group; ``placement`` must be the one these banks hold or a staged one."""
        if placement.version != self.version:
            self._switch(placement.version)
        self.actor_index = info.rank - info.num_attention
        self.info = info
        self.group = init_group(info, master_addr, master_port, previous=self.group)
        return transport(self.group)

    def slot_contents(self) -> dict[int, list[int | None]]:
        return {layer: list(bank.logical) for layer, bank in self.banks.items()}

    def slot_load(self) -> dict[int, list[int]]:
        """Rows computed per physical slot and MoE layer since the current placement was switched in."""
        return self.rows_per_slot

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # applying a new placement
    def prepare(self, placement: Placement, actor_index: int | None = None) -> None:
        """Start loading the banks of ``placement`` for this actor (``actor_index``: its index in that
        placement, when scaling renumbers actors) in the background; returns at once."""
        index = self.actor_index if actor_index is None else actor_index
        if self._staging is not None:  # an abandoned staging stops at its next layer; never waited for here
            self._staging.cancelled.set()
        self._staged, self._stage_error = None, None
        self._staging = threading.Thread(target=self._stage, args=(placement, index), daemon=True,
                                         name=f"stage-v{placement.version}")
        self._staging.cancelled = threading.Event()
        self._staging.start()

    def _stage(self, placement: Placement, index: int) -> None:
        me = threading.current_thread()
        try:
            staged = self._stage_banks(placement, index, me.cancelled)
        except Exception as e:  # noqa: BLE001 - reported in the next step's output; the change is aborted
            if not me.cancelled.is_set():
                self._stage_error = f"{type(e).__name__}: {e}"
            return
        if staged is not None and not me.cancelled.is_set():
            self._staged = staged

    def _stage_banks(self, placement: Placement, index: int, cancelled: threading.Event):
        t0 = time.perf_counter()
        banks, read = {}, 0
        with torch.inference_mode():
            for layer, logical in placement.slot_contents(index).items():
                if cancelled.is_set():
                    return None
                banks[layer], n = self.banks[layer].restaged(self.reader, layer, logical)
                read += n
        return placement.version, banks, {"experts_read": read, "seconds": time.perf_counter() - t0}

    def staged_version(self) -> int | None:
        return self._staged[0] if self._staged is not None else None

    def _switch(self, version: int) -> dict:
        if self._staging is not None:
            self._staging.join()
        if self._staged is None or self._staged[0] != version:
            raise RuntimeError(f"expert actor {self.actor_index}: placement version {version} was not prepared")
        _, self.banks, figures = self._staged
        self.version, self._staged, self._staging = version, None, None
        self.rows_per_slot = {layer: [0] * bank.num_slots for layer, bank in self.banks.items()}
        return figures

    @torch.inference_mode()
    def step(self, switch_to: int | None = None, steps: int = 1, capacity_tokens: int = 0,
             micro_batches: int = 1) -> ExpertStepOutput:
        """Serve ``steps`` model steps (every MoE layer each, once per micro-batch), as the attention
        shards' call runs; ``capacity_tokens``: the call's bound on a shard's micro-batch's tokens per
        model step (``StepPlan``)."""
        self.timer.seconds.clear()
        if switch_to is not None and switch_to != self.version:
            self._switch(switch_to)
        rows = [0] * len(self.args.moe_layers)
        # the shards' order: every MoE layer once per micro-batch (micro-batch 0, 1, ...), then the next layer
        rounds = [(i, layer) for i, layer in enumerate(self.args.moe_layers) for _ in range(micro_batches)]
        for _ in range(steps):
            for i, layer in rounds:
                per_slot = serve_expert_layer(self.info, self.group, self.banks[layer], self.args.hidden_size,
                                              self.dtype, self.args.num_experts_per_tok, self.timer, capacity_tokens)
                self.rows_per_slot[layer] = [a + b for a, b in zip(self.rows_per_slot[layer], per_slot,
                                                                   strict=True)]
                rows[i] += sum(per_slot)
        self.rows_total += sum(rows)
        return ExpertStepOutput(rows, dict(self.timer.seconds), self.version, self.staged_version(), self.rows_total,
                                self._stage_error)


@ray.remote
class ExpertActor(ExpertGroup):
    pass

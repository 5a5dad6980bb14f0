"""Restaging an expert bank for a new placement equals loading that placement from the checkpoint,
for bf16 and block-FP8 checkpoints (FP8 weights stay FP8 with their scales), and reads only the
experts it does not hold."""

import pytest
import torch

from actors.expert_bank import ExpertBank
from model.checkpoint import CheckpointReader


class CountingReader:
    def __init__(self, reader):
        self.reader, self.names = reader, []

    def read(self, names, device="cpu"):
        self.names += list(names)
        return self.reader.read(names, device=device)


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_fp8_dir"])
def test_restaged_equals_a_fresh_load(request, fixture):
    reader = CheckpointReader(request.getfixturevalue(fixture))
    args, layer = reader.args, reader.args.moe_layers[0]
    old = ExpertBank.load(reader, layer, [0, 1, 2, None], args, torch.float32)
    counting = CountingReader(reader)
    target = [2, 7, None, 0, 9]  # more slots than before, reordered, with new experts
    new, n_read = old.restaged(counting, layer, target)
    fresh = ExpertBank.load(reader, layer, target, args, torch.float32)
    assert n_read == 2 and {n.split(".experts.")[1].split(".")[0] for n in counting.names} == {"7", "9"}
    assert new.logical == target
    for p, w in fresh.weights.items():
        assert new.weights[p].dtype == w.dtype and torch.equal(new.weights[p], w)
    if old.fp8:
        assert new.weights["gate_proj"].dtype == torch.float8_e4m3fn
        for p, s in fresh.scales.items():
            assert torch.equal(new.scales[p], s)
    assert old.logical == [0, 1, 2, None]  # the old bank keeps serving until the switch


def test_a_second_prepare_replaces_the_first_without_waiting_for_it(tiny_dir):
    """The expert actor's staging (no Ray: the plain class): a newer placement prepared while an
    older one is still loading wins; the older is dropped; the switch installs the newer's banks."""
    import time

    from actors.expert import ExpertGroup
    from actors.placement import Placement

    args = CheckpointReader(tiny_dir).args
    p0 = Placement.initial(args.moe_layers, args.n_routed_experts, 2, spare_slots=1)
    g = ExpertGroup(str(tiny_dir), 0, p0, "float32")
    p1 = Placement(2, p0.slots_per_actor, p0.layers, version=1)
    swapped = {layer: [[(1 - a, s) for a, s in reps] for reps in table] for layer, table in p0.layers.items()}
    p2 = Placement(2, p0.slots_per_actor, swapped, version=2)
    g.prepare(p1)
    g.prepare(p2)
    deadline = time.time() + 60
    while g.staged_version() != 2 and time.time() < deadline:
        time.sleep(0.01)
    assert g.staged_version() == 2 and g._stage_error is None
    g._switch(2)
    assert g.version == 2 and g.slot_contents() == p2.slot_contents(0)

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

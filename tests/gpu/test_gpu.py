"""On a CUDA device: the data plane keeps every tensor on the GPU, the single process on the GPU
agrees with the CPU, and the cluster on NCCL agrees with the single process (where the machine has a
GPU per actor). The Triton kernels' own checks run from tests/kernels, which picks CUDA when present."""

import os
import tempfile

import pytest
import torch

from model.sampling import SamplingParams
from tests.actors.test_dispatch import check_dispatch

PROMPTS = ["Hello world, the expert", "A", "The cluster of actors is large and the router sends tokens", [5, 6, 7]]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "fp8"])
def test_dispatch_on_cuda(tiny_dir, tiny_fp8_dir, monkeypatch, dtype):
    if dtype == "fp8":  # rows quantised on the wire with the Triton act_quant, the expert's FP8 GEMM on them
        check_dispatch(tiny_fp8_dir, monkeypatch, torch.bfloat16, "cuda", 37, 2, fp8=True)
    else:
        check_dispatch(tiny_dir, monkeypatch, dtype, "cuda")


@pytest.mark.parametrize("ckpt", ["tiny_dir", "tiny_fp8_dir"])
def test_single_process_on_cuda_matches_cpu(request, ckpt):
    from model.generate import LocalLLM

    path = request.getfixturevalue(ckpt)
    cpu = LocalLLM(path, dtype="float32", progress=False).generate(PROMPTS, GREEDY)
    gpu = LocalLLM(path, dtype="float32", device="cuda", progress=False).generate(PROMPTS, GREEDY)
    for c, g in zip(cpu, gpu, strict=True):
        # TF32 and other kernels differ in the last bits: ids equal, logprobs close
        assert g.output_ids == c.output_ids
        for pc, pg in zip(c.top_logprobs, g.top_logprobs, strict=True):
            assert max(abs(a[1] - b[1]) for a, b in zip(pc, pg, strict=True)) < 2e-2


@pytest.mark.parametrize("shards,experts", [(1, 1), (1, 2)])
def test_cluster_on_nccl_matches_single_process(tiny_dir, shards, experts):
    if torch.cuda.device_count() < shards + experts:
        pytest.skip(f"NCCL needs one GPU per actor: {shards + experts} actors, {torch.cuda.device_count()} GPU(s)")
    import ray

    from cluster.api import RayMoE
    from model.generate import LocalLLM

    expected = LocalLLM(tiny_dir, dtype="float32", device="cuda", progress=False).generate(PROMPTS, GREEDY)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="rmg", dir="/tmp"))
    try:
        with RayMoE.start(tiny_dir, attention_shards=shards, expert_actors=experts, dtype="float32",
                          device="cuda") as llm:
            got = llm.generate(PROMPTS, GREEDY)
    finally:
        ray.shutdown()
    assert [g.output_ids for g in got] == [e.output_ids for e in expected]

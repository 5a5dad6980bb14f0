"""Loading checkpoints: subsets, sharding, and clear errors for bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, CheckpointReader, load_model
from model.config import ModelArgs
from tests.helpers import rewrite_config


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_reader_reads_a_subset_across_shards(tiny_dir):
    reader = CheckpointReader(tiny_dir)
    assert len(set(reader.weight_map.values())) == 2
    names = ["model.layers.2.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.0.down_proj.weight"]
    got = reader.read(names)
    assert set(got) == set(names)
    model = load_model(tiny_dir, torch.bfloat16, progress=False)
    assert torch.equal(got[names[0]], model.model.layers[2].mlp.experts[5].gate_proj.weight)


def test_loads_without_index(ckpt):
    (ckpt / "model.safetensors.index.json").unlink()
    reader = CheckpointReader(ckpt)
    assert "lm_head.weight" in reader


def test_missing_tensor_is_named(ckpt):
    reader = CheckpointReader(ckpt)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    file = ckpt / reader.weight_map[name]
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="kv_b_proj.weight' is missing"):
        load_model(ckpt, progress=False)


def test_wrong_shape_names_both_shapes(ckpt):
    rewrite_config(ckpt, moe_intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"shape \[96, 160\].*expects \[64, 160\]"):
        load_model(ckpt, progress=False)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="safetensors only"):
        CheckpointReader(tmp_path)


def test_index_naming_a_missing_shard(ckpt):
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointReader(ckpt)


def test_unsupported_model_type(ckpt):
    rewrite_config(ckpt, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_model(ckpt, progress=False)


def test_fp8_config_without_fp8_weights(ckpt):
    rewrite_config(ckpt, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(CheckpointError, match="FP8"):
        load_model(ckpt, progress=False)


@pytest.mark.parametrize("key,value,match", [
    ("scoring_func", "relu", "scoring_func"),
    ("topk_method", "random", "topk_method"),
    ("n_group", 3, "n_group"),
    ("topk_group", 9, "topk_group"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, "original_max_position_embeddings"),
    ("quantization_config", {"quant_method": "gptq"}, "quant_method"),
])
def test_config_errors_name_the_key(tiny_dir, key, value, match):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg[key] = value
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_hf(cfg)


def test_presets_parse():
    v3 = ModelArgs.from_preset("deepseek-v3")
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.is_fp8, len(v3.moe_layers)) == (256, 8, True, 58)
    lite = ModelArgs.from_preset("deepseek-v2-lite")
    assert (lite.num_hidden_layers, lite.hidden_size, lite.n_routed_experts, lite.n_shared_experts) == (27, 2048, 64, 2)
    assert (lite.num_experts_per_tok, lite.kv_lora_rank, lite.q_lora_rank, lite.scoring_func) == (6, 512, 0, "softmax")
    v32 = ModelArgs.from_preset("deepseek-v3.2-exp")
    assert v32.index_topk == 2048 and v32.quant.scale_fmt == "ue8m0"
    with pytest.raises(ValueError, match="known presets"):
        ModelArgs.from_preset("nope")


def test_v3_softmax_scale_has_yarn_mscale():
    v3 = ModelArgs.from_preset("deepseek-v3")
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1
    assert v3.softmax_scale == pytest.approx(192**-0.5 * m * m)

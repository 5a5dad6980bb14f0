"""config.json -> ModelArgs: presets, derived values, and errors that name the key and the value."""

import json
import re

import pytest
import torch

from model.config import ModelArgs, args_to_hf


@pytest.fixture
def tiny_cfg(tiny_dir) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())


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


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3", "deepseek-v2-lite", "deepseek-v3.2-exp"])
def test_args_to_hf_round_trips(preset):
    args = ModelArgs.from_preset(preset)
    assert ModelArgs.from_hf(json.loads(json.dumps(args_to_hf(args)))) == args


def test_v3_softmax_scale_has_yarn_mscale():
    v3 = ModelArgs.from_preset("deepseek-v3")
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1
    assert v3.softmax_scale == pytest.approx(192**-0.5 * m * m)


@pytest.mark.parametrize("key,value,match", [
    ("scoring_func", "relu", "scoring_func"),
    ("topk_method", "random", "topk_method"),
    ("n_group", 3, "n_group"),
    ("topk_group", 9, "topk_group"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "dynamic"),
    ("rope_scaling", {"type": "yarn", "original_max_position_embeddings": 1024}, "factor"),
    ("mlp_bias", True, "mlp_bias"),
    ("quantization_config", {"quant_method": "gptq"}, "quant_method"),
])
def test_unsupported_values_name_the_key(tiny_cfg, key, value, match):
    tiny_cfg[key] = value
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_hf(tiny_cfg)


@pytest.mark.parametrize("key,value,message", [
    ("hidden_size", "abc", "config.json: hidden_size must be an integer, got 'abc'"),
    ("num_hidden_layers", 2.5, "config.json: num_hidden_layers must be an integer, got 2.5"),
    ("vocab_size", True, "config.json: vocab_size must be an integer, got True"),
    ("hidden_size", None, "config.json: hidden_size must be an integer, got null"),
    ("first_k_dense_replace", "1", "config.json: first_k_dense_replace must be an integer, got '1'"),
    ("routed_scaling_factor", "2.5", "config.json: routed_scaling_factor must be a number, got '2.5'"),
    ("rms_norm_eps", False, "config.json: rms_norm_eps must be a number, got False"),
    ("norm_topk_prob", "yes", "config.json: norm_topk_prob must be true or false, got 'yes'"),
    ("scoring_func", 1, "config.json: scoring_func must be a string, got 1"),
    ("model_type", 3, "config.json: model_type must be a string, got 3"),
    ("eos_token_id", "</s>", "config.json: eos_token_id must be an integer, a list of integers or null, got '</s>'"),
    ("eos_token_id", [1.5], "config.json: eos_token_id must be an integer, a list of integers or null, got [1.5]"),
    ("rope_scaling", {"type": "yarn", "factor": "4", "original_max_position_embeddings": 1024},
     "config.json: rope_scaling.factor must be a number, got '4'"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024.5},
     "config.json: rope_scaling.original_max_position_embeddings must be an integer, got 1024.5"),
    ("rope_theta", [1], "config.json: rope_theta must be a number, got [1]"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": ["128", 128]},
     "config.json: quantization_config.weight_block_size must be [rows, cols] (two integers), got ['128', 128]"),
    ("quantization_config", [1], "config.json: quantization_config must be a JSON object, got [1]"),
])
def test_wrong_types_name_key_value_and_type(tiny_cfg, key, value, message):
    tiny_cfg[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelArgs.from_hf(tiny_cfg)


@pytest.mark.parametrize("key", ["hidden_size", "kv_lora_rank", "v_head_dim", "model_type"])
def test_missing_required_key_is_named(tiny_cfg, key):
    del tiny_cfg[key]
    with pytest.raises(ValueError, match=re.escape(f"config.json: {key} is required but missing")):
        ModelArgs.from_hf(tiny_cfg)


def test_lenient_where_harmless(tiny_cfg):
    # integral floats, null optionals, ints for float keys and an eos list are what real configs carry
    tiny_cfg.update(hidden_size=160.0, n_shared_experts=None, rope_theta=10000, eos_token_id=[1, 2])
    args = ModelArgs.from_hf(tiny_cfg)
    assert (args.hidden_size, type(args.hidden_size), args.n_shared_experts) == (160, int, 0)
    assert (args.rope.theta, type(args.rope.theta), args.eos_token_id) == (10000.0, float, 1)


def test_config_file_not_json(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 160,,}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))} is not valid JSON "
                                         r"\(line 1 column 21: Expecting property name"):
        ModelArgs.from_hf(tmp_path)


@pytest.mark.parametrize("text,kind", [("[1, 2]", "a list"), ("null", "null"), ("7", "a number")])
def test_config_file_not_an_object(tmp_path, text, kind):
    (tmp_path / "config.json").write_text(text)
    message = f"{tmp_path / 'config.json'} must hold a JSON object, got {kind}"
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelArgs.from_hf(tmp_path / "config.json")


def test_generation_defaults_read_what_generation_config_sets(tmp_path):
    from model.config import generation_defaults

    assert generation_defaults(tmp_path) == {}  # no file
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 40, "eos_token_id": [1, 7]}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 40, "eos_token_ids": [1, 7]}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 9, "top_p": 0, "top_k": 2.5, "eos_token_id": 1}))  # out of range: left to the request
    assert generation_defaults(tmp_path) == {"eos_token_ids": [1]}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert generation_defaults(tmp_path) == {}

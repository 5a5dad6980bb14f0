"""Loading checkpoints: subsets, sharding, and clear errors for bad input; ``validate_checkpoint``."""

import json
import re
import shutil

import pytest
import torch

import model.checkpoint
from model.checkpoint import INDEX_FILE, CheckpointError, CheckpointReader, load_model, validate_checkpoint
from model.config import ModelArgs
from model.generate import LocalLLM
from tests.helpers import remove_tensors, rewrite_config


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.fixture
def fp8_ckpt(tiny_fp8_dir, tmp_path):
    dst = tmp_path / "fp8"
    shutil.copytree(tiny_fp8_dir, dst)
    return dst


def truncate(file, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def second_shard(ckpt):
    return next(ckpt.glob("model-00002-*.safetensors"))


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
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    remove_tensors(ckpt, [name])
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


# corrupt files


def test_truncated_shard_named_when_read(ckpt):
    shard = second_shard(ckpt)
    name = next(n for n, f in CheckpointReader(ckpt).weight_map.items() if f == shard.name)
    truncate(shard)
    reader = CheckpointReader(ckpt)  # with an index, opening the reader reads no shard
    message = f"{shard} is truncated or corrupt"
    with pytest.raises(CheckpointError, match=re.escape(message) + ".*re-download or re-write it"):
        reader.read([name])
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(ckpt, progress=False)


def test_truncated_shard_named_without_index(ckpt):
    (ckpt / INDEX_FILE).unlink()
    shard = second_shard(ckpt)
    truncate(shard)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard} is truncated or corrupt")):
        CheckpointReader(ckpt)


def test_index_not_json(ckpt):
    (ckpt / INDEX_FILE).write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / INDEX_FILE} is not valid JSON")):
        CheckpointReader(ckpt)


def test_index_weight_map_values_must_be_file_names(ckpt):
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = ["model-00001-of-00002.safetensors"]
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'lm_head.weight' to .*, not a file name"):
        CheckpointReader(ckpt)


# validate_checkpoint


def test_validate_accepts_the_tiny_checkpoints(tiny_dir, tiny_fp8_dir):
    assert validate_checkpoint(tiny_dir, need_tokenizer=True) == ModelArgs.from_hf(tiny_dir)
    args = validate_checkpoint(tiny_fp8_dir)
    assert args.is_fp8 and args == ModelArgs.from_hf(tiny_fp8_dir)


def test_validate_reads_headers_only(tiny_dir, monkeypatch):
    def no_open(*a, **k):
        raise AssertionError("validate_checkpoint opened a shard with safe_open")

    monkeypatch.setattr(model.checkpoint, "safe_open", no_open)
    assert validate_checkpoint(tiny_dir).num_hidden_layers == 4


def test_validate_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint folder {tmp_path / 'nope'} does not exist")):
        validate_checkpoint(tmp_path / "nope")


def test_validate_bad_config_is_a_checkpoint_error(ckpt):
    rewrite_config(ckpt, hidden_size="abc")
    with pytest.raises(CheckpointError, match=re.escape("config.json: hidden_size must be an integer, got 'abc'")):
        validate_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / 'config.json'} not found")):
        validate_checkpoint(ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_validate_truncated_shard(ckpt, keep):
    shard = second_shard(ckpt)
    size = shard.stat().st_size
    truncate(shard, keep)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{shard} is truncated or corrupt (its header describes {size} bytes but the file holds "
            f"{int(size * keep)}); re-download or re-write it")):
        validate_checkpoint(ckpt)


def test_validate_shard_with_bytes_appended(ckpt):
    shard = second_shard(ckpt)
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + b"\0" * 10)
    with pytest.raises(CheckpointError, match=re.escape(f"describes {size} bytes but the file holds {size + 10}")):
        validate_checkpoint(ckpt)


@pytest.mark.parametrize("head,reason", [
    (b"\x05\x00", "it is shorter than the 8-byte header length"),
    ((10**12).to_bytes(8, "little"), "its header length 1000000000000 is impossible in a file of 8 bytes"),
    ((6).to_bytes(8, "little") + b"{nope}", "its header is not valid JSON"),
    ((2).to_bytes(8, "little") + b"[]", "its header is not a JSON object"),
    ((24).to_bytes(8, "little") + b'{"t": {"dtype": "BF16"}}',
     "its header entry 't' is malformed; it needs dtype, shape and data_offsets"),
])
def test_validate_broken_header(ckpt, head, reason):
    shard = second_shard(ckpt)
    shard.write_bytes(head)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard} is truncated or corrupt ({reason})")):
        validate_checkpoint(ckpt)


def test_validate_index_disagrees_with_shard(ckpt):
    index = json.loads((ckpt / INDEX_FILE).read_text())
    name = "model.norm.weight"
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}[index["weight_map"][name]]
    index["weight_map"][name] = other
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{ckpt / INDEX_FILE} puts 'model.norm.weight' in {other}, whose header does not list it")):
        validate_checkpoint(ckpt)


@pytest.mark.parametrize("names,message", [
    (["model.layers.1.self_attn.kv_b_proj.weight"], "tensor 'model.layers.1.self_attn.kv_b_proj.weight' is missing"),
    (["model.layers.3.mlp.experts.15.down_proj.weight"],
     "tensor 'model.layers.3.mlp.experts.15.down_proj.weight' is missing"),
    (["lm_head.weight", "model.norm.weight"], "tensor 'model.norm.weight' (and 1 more) is missing"),
    (["model.layers.4.eh_proj.weight"], "tensor 'model.layers.4.eh_proj.weight' is missing"),  # MTP layer partial
])
def test_validate_missing_tensor(ckpt, names, message):
    remove_tensors(ckpt, names)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        validate_checkpoint(ckpt)


def test_validate_mtp_weights_are_optional(ckpt):
    mtp = [n for n in CheckpointReader(ckpt).weight_map if n.startswith("model.layers.4.")]
    assert len(mtp) > 40
    remove_tensors(ckpt, mtp)
    # as transformers saves a DeepSeek-V3 (num_nextn_predict_layers 1 in the config, no layer in the
    # weights): it validates, loads and serves; the args count only the MTP layers the weights hold
    assert validate_checkpoint(ckpt).num_nextn_predict_layers == 0
    assert load_model(ckpt, torch.float32, progress=False).mtp_layers == []
    with pytest.raises(ValueError, match="no MTP layer in its weights"):
        LocalLLM(ckpt, dtype="float32", progress=False, speculative_tokens=1)


def test_validate_wrong_shape(ckpt):
    rewrite_config(ckpt, moe_intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"shape \[96, 160\].*expects \[64, 160\]"):
        validate_checkpoint(ckpt)


def test_validate_fp8_scale_missing(fp8_ckpt):
    remove_tensors(fp8_ckpt, ["model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"])
    with pytest.raises(CheckpointError, match=re.escape(
            "'model.layers.2.mlp.experts.3.up_proj.weight' has no "
            "'model.layers.2.mlp.experts.3.up_proj.weight_scale_inv'")):
        validate_checkpoint(fp8_ckpt)


def test_validate_fp8_config_on_bf16_weights(ckpt):
    rewrite_config(ckpt, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(CheckpointError, match="config.json has an FP8 quantization_config but"):
        validate_checkpoint(ckpt)


def test_validate_tokenizer_only_when_needed(ckpt):
    (ckpt / "tokenizer.json").unlink()
    validate_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{ckpt / 'tokenizer.json'} is missing; the page takes text")):
        validate_checkpoint(ckpt, need_tokenizer=True)


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json"])
def test_validate_broken_tokenizer(ckpt, file):
    (ckpt / file).write_text('{"model": ')
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / file} does not load (")):
        validate_checkpoint(ckpt, need_tokenizer=True)

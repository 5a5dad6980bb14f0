"""A bad checkpoint is refused by the driver before Ray or any actor starts: one clear error."""

import shutil

import pytest

from cluster.api import RayMoE
from model.checkpoint import CheckpointError
from tests.helpers import rewrite_config


@pytest.fixture
def broken(tiny_dir, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


def _start_fails(path, match, **kw):
    import ray

    with pytest.raises(CheckpointError, match=match):
        RayMoE.start(path, **kw)
    assert not ray.is_initialized()  # refused before Ray started


def test_truncated_shard_is_named_before_ray_starts(broken):
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _start_fails(broken, shard.name)


def test_non_integer_config_value_names_the_key(broken):
    rewrite_config(broken, hidden_size="abc")
    _start_fails(broken, "hidden_size")


def test_missing_tokenizer_is_refused_when_the_page_needs_text(broken):
    (broken / "tokenizer.json").unlink()
    _start_fails(broken, "tokenizer.json", need_tokenizer=True)

"""The ``raymoe`` command line: make-tiny, generate --json, errors."""

import json

import torch
from safetensors.torch import load_file

from cluster.cli import main
from model.sampling import SamplingParams


def test_generate_json_matches_single_process(tiny_dir, tiny_llm, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--local", "--prompt", "Hello experts", "--prompt-ids",
               "5,6,7", "--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32", "--logprobs", "3",
               "--ignore-eos", "--json"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = tiny_llm.generate(["Hello experts", [5, 6, 7]],
                                 SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=3))
    assert len(lines) == 2
    for line, ref in zip(lines, expected, strict=True):
        assert line["output_ids"] == ref.output_ids and line["text"] == ref.text
        assert len(line["top_logprobs"]) == 6 and all(len(p) == 3 for p in line["top_logprobs"])
        assert [p[0][0] for p in line["top_logprobs"]] == ref.output_ids


def test_generate_rejects_bad_values(tiny_dir, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--top-p", "0"])
    assert rc == 2 and "top_p" in capsys.readouterr().err


def test_usage_errors_are_one_line_and_exit_2(tiny_dir, capsys):
    """None of these starts anything: each is one line naming the problem, exit code 2."""
    cases = [
        (["generate", "--model", str(tiny_dir), "--local", "--prompt-ids", "1,x"], "--prompt-ids takes"),
        (["generate", "--model", str(tiny_dir), "--local"], "give at least one --prompt"),
        (["generate", "--model", str(tiny_dir), "--local", "--prompt", "x", "--expert-actors", "3"],
         "--expert-actors set(s) up a cluster; --local runs one process"),
        (["generate", "--model", str(tiny_dir / "config.json"), "--local", "--prompt", "x"],
         "is a file; give the checkpoint folder"),
        (["make-tiny", str(tiny_dir / "config.json")], "config.json"),
    ]
    for argv, problem in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, (argv, err)


def test_train_tiny_takes_its_own_flags(capsys):
    """argparse's REMAINDER dropped every flag of train-tiny (even --help) before: its parser reads them."""
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["train-tiny", "--help"])
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train-tiny", "--steps", "0"])
    assert e.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err


def test_make_tiny_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert main(["make-tiny", str(tmp_path / name), "--fp8", "--seed", "5"]) == 0
    for file in sorted((tmp_path / "a").glob("*.safetensors")):
        a, b = load_file(file), load_file(tmp_path / "b" / file.name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_generate_through_the_cluster_matches_local(tiny_dir, tiny_llm, capsys):
    """Without --local, generate starts embedded Ray, runs the prompts on the cluster, and stops it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Hello experts", "--prompt-ids", "5,6,7",
               "--max-new-tokens", "5", "--temperature", "0", "--dtype", "float32", "--ignore-eos", "--json",
               "--attention-shards", "1", "--expert-actors", "2"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = tiny_llm.generate(["Hello experts", [5, 6, 7]],
                                 SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))
    assert [line["output_ids"] for line in lines] == [r.output_ids for r in expected]
    assert not ray.is_initialized()

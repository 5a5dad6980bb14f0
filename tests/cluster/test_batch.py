"""Batch generation in-process: error lines for bad input, one line per id, resuming."""

import json
from pathlib import Path

import pytest

from cluster.api import RayMoE
from cluster.batch import run_batch
from model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def llm(ray_local, tiny_dir):
    with RayMoE.start(tiny_dir, attention_shards=1, expert_actors=2, dtype="float32") as llm:
        yield llm


def test_bad_lines_become_error_lines_and_the_rest_completes(llm, tmp_path):
    too_long = "hello " * 5000
    lines = [
        json.dumps({"id": "a", "prompt": "Hello world"}),
        "{not json",
        json.dumps({"id": "b", "prompt": too_long}),
        json.dumps({"id": "c", "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 4}),
        json.dumps({"prompt": "no id"}),
        json.dumps({"id": "d", "prompt": "x", "temperature": -3}),
        json.dumps({"id": "e", "prompt": "x", "colour": "blue"}),
        "",
        json.dumps({"id": "a", "prompt": "duplicate id"}),
        json.dumps({"id": 7, "prompt": "The expert"}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", GREEDY, progress=False)
    out = {str(r["id"] if r["id"] is not None else f"line {r['line']}"): r for r in _read(tmp_path / "out.jsonl")}
    assert sorted(out) == ["7", "a", "b", "c", "d", "e", "line 2", "line 5"]
    assert {k for k, r in out.items() if "error" in r} == {"b", "d", "e", "line 2", "line 5"}
    assert "context" in out["b"]["error"] and "temperature" in out["d"]["error"] and "colour" in out["e"]["error"]
    assert "not valid JSON" in out["line 2"]["error"] and "id" in out["line 5"]["error"]
    assert summary["ok"] == 3 and summary["failed"] == 5
    ref = llm.generate(["Hello world", [{"role": "user", "content": "Hi"}], "The expert"],
                       [GREEDY, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True), GREEDY])
    assert [out[k]["output_ids"] for k in ("a", "c", "7")] == [r.output_ids for r in ref]
    assert out["a"]["finish_reason"] == "length" and out["a"]["completion_tokens"] == 6


def test_rerun_resumes_and_repairs_a_torn_line(llm, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"prompt {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 0, "text": "kept", "output_ids": []}) + "\n" + '{"id": 1, "te')  # killed mid-write
    summary = run_batch(llm, inp, out, GREEDY, progress=False)
    records = _read(out)
    assert sorted(r["id"] for r in records) == list(range(6))
    assert records[0]["text"] == "kept" and summary["already_done"] == 1 and summary["ok"] == 5


def test_a_poisonous_line_never_reaches_the_cluster(llm, tmp_path):
    """A line with a float top_k once failed every step (and every request in flight with it)."""
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "prompt": f"prompt {i}"}) for i in range(10)]
    lines.insert(3, json.dumps({"id": "bad", "prompt": "x", "top_k": 2.5}))
    inp.write_text("\n".join(lines) + "\n")
    recoveries = llm.engine.totals["recoveries"]
    summary = run_batch(llm, inp, tmp_path / "out.jsonl", GREEDY, progress=False)
    records = {r["id"]: r for r in _read(tmp_path / "out.jsonl")}
    assert summary["ok"] == 10 and "top_k must be an integer" in records["bad"]["error"]
    assert llm.engine.totals["recoveries"] == recoveries

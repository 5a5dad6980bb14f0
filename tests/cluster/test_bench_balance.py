"""``raymoe bench balance`` end to end on one small layout: the JSON it writes holds measured figures
that agree with each other (the balanced placement is measured less skewed than the initial one)."""

import json
from types import SimpleNamespace

import pytest


@pytest.mark.slow
def test_bench_balance_writes_measured_rows(tiny_dir, tmp_path):
    from cluster.bench_balance import main

    out = tmp_path / "balance.json"
    args = SimpleNamespace(model=str(tiny_dir), layouts="1x3", batch_sizes="4", prompt_len=16, new_tokens=8,
                           dtype="float32", spare_slots=2, out=str(out))
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["layout"] for r in rows] == ["1x3", "1x3"]
    skewed = rows[0]
    assert skewed["version"] == 1 and skewed["moved"] > 0 and skewed["redundant_experts"] > 0
    assert max(skewed["max_mean_after"].values()) < max(skewed["max_mean_before"].values())
    assert skewed["predicted_after"] < skewed["predicted_before"]
    assert skewed["longest_step_ms"] >= skewed["median_step_ms"] > 0

"""``raymoe bench collective`` on three local processes: every way of moving rows completes a round
trip and the JSON holds a positive time for each row count and mode."""

import json
from types import SimpleNamespace

import pytest


@pytest.mark.slow
def test_bench_collective_writes_rows(tmp_path):
    import cluster.bench_collective as bench

    out = tmp_path / "collective.json"
    assert bench.main(SimpleNamespace(rows="1,16", repeats=1, out=str(out))) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["rows"], r["mode"]) for r in rows) == sorted((n, m) for n in (1, 16) for m in bench.MODES)
    assert all(r["ms"] > 0 for r in rows)

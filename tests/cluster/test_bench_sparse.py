"""``raymoe bench sparse`` on two short contexts: the JSON holds positive timings for both paths."""

import json
from types import SimpleNamespace

import pytest


@pytest.mark.slow
def test_bench_sparse_writes_rows(tmp_path, monkeypatch):
    import cluster.bench_sparse as bench

    monkeypatch.setitem(bench.SHAPES, "index_topk", 64)  # so that the sparse path runs at these contexts
    out = tmp_path / "sparse.json"
    args = SimpleNamespace(contexts="32,256", batch_sizes="1", repeats=1, out=str(out))
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["index_fp8"], r["context"]) for r in rows] == [(False, 32), (False, 256), (True, 32), (True, 256)]
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in rows)

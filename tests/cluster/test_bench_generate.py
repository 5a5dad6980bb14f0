"""``raymoe bench generate``'s arithmetic, on a fake clock: every run advances it by a known time."""

from cluster import bench_generate


def test_decode_rates_take_turns_and_keep_each_contenders_best(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(bench_generate.time, "perf_counter", lambda: clock[0])
    # seconds per run: a fixed prefill plus a cost per new token; "a"'s first repeat is slow (a machine
    # busy for a while), which its best timing must leave out
    cost = {"a": (0.1, 0.01), "b": (0.2, 0.04)}

    def run(name):
        def go(n):
            calls.append((name, n))
            prefill, per_token = cost[name]
            clock[0] += (prefill + per_token * n) * (3 if name == "a" and len(calls) <= 2 else 1)
        return go

    rates = bench_generate._decode_rates({"a": run("a"), "b": run("b")}, batch=4, new_tokens=8, repeats=2)
    assert calls == [("a", 8), ("a", 1), ("b", 8), ("b", 1)] * 2  # turns within each repeat
    # rate = batch * (N - 1) / (t(N) - t(1)); prefill = t(1) in ms
    (rate_a, prefill_a), (rate_b, prefill_b) = rates["a"], rates["b"]
    assert abs(rate_a - 4 * 7 / 0.07) < 1e-6 and abs(prefill_a - 110) < 1e-6
    assert abs(rate_b - 4 * 7 / 0.28) < 1e-6 and abs(prefill_b - 240) < 1e-6

"""``raymoe batch`` under misuse, without a cluster: a stand-in for the cluster handle takes the
requests, so these tests show what reaches the cluster, what is written, and what is refused."""

import json
import os
import threading
from pathlib import Path

import pytest

from cluster.batch import BatchError, run_batch
from cluster.cli import main as cli_main
from model.sampling import SamplingParams
from model.sequence import GenerationResult, Sequence

DEFAULTS = SamplingParams(temperature=0, max_new_tokens=4)


class FakeLLM:
    """Answers each prompt with its length in tokens; ``fail`` holds prompts the 'engine' fails.
    Builds the engine's ``Sequence`` for every request, so the same checks run as in the cluster."""

    def __init__(self, fail=()):
        self.submitted, self.fail, self.results = [], set(fail), {}

    def submit(self, prompt, params):
        if isinstance(prompt, list):
            prompt = "".join(m["content"] for m in prompt)
        Sequence(0, list(range(1, len(prompt) + 2)), params, None, None, max_len=4096)
        rid = len(self.submitted)
        self.submitted.append((prompt, params))
        out = [len(prompt)] * params.max_new_tokens
        error = "step failed: an actor died" if prompt in self.fail else None
        k = params.logprobs  # position i: token t = len(prompt) at -0.25 * (i + 1), then the alternatives t + j
        top = [[[len(prompt) + j, -0.25 * (i + 1) - j] for j in range(k)] for i in range(len(out))] if k else []
        self.results[rid] = GenerationResult([1], out, f"text:{prompt}", "error" if error else "length", top,
                                             error=error, token_logprobs=[row[0][1] for row in top])
        return rid

    def result(self, rid):
        return self.results[rid]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write(path: Path, *objs) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")
    return path


def test_output_equal_to_input_is_refused_and_nothing_is_written(tmp_path):
    inp = _write(tmp_path / "in.jsonl", *({"id": i, "prompt": f"p{i}"} for i in range(1000)))
    before = inp.read_bytes()
    with pytest.raises(BatchError, match="is the input file"):
        run_batch(FakeLLM(), inp, inp, DEFAULTS, progress=False)
    link = tmp_path / "link.jsonl"
    os.symlink(inp, link)
    assert cli_main(["batch", "--input", str(inp), "--output", str(link)]) == 2  # before any cluster starts
    assert inp.read_bytes() == before


@pytest.mark.parametrize("content", ["# README\n\nsome text\n", '{"id": 1, "prompt": "an input file"}\n',
                                     "no newline at the end", '{"id": "x", "text": "ok"}\nnot a record\n'])
def test_an_existing_file_that_is_not_a_results_file_is_never_touched(tmp_path, content, capsys):
    inp = _write(tmp_path / "in.jsonl", {"id": 1, "prompt": "hi"})
    out = tmp_path / "README.md"
    out.write_text(content)
    with pytest.raises(BatchError, match="not a raymoe results file"):
        run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    assert cli_main(["batch", "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a raymoe results file" in err and len(err.splitlines()) == 1
    assert out.read_text() == content


def test_output_location_is_checked_before_the_cluster_starts(tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", {"id": 1, "prompt": "hi"})
    assert cli_main(["batch", "--input", str(inp), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli_main(["batch", "--input", str(inp), "--output", str(tmp_path / "nope" / "out.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["batch", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err


@pytest.mark.parametrize("field", [{"top_k": 2.5}, {"logprobs": 1.5}, {"seed": 1.5}, {"seed": "7"}, {"top_k": True},
                                   {"temperature": "0.5"}, {"max_new_tokens": 10**9}, {"stop": [1]},
                                   {"ignore_eos": "yes"}, {"logprobs": 10**6}])
def test_a_bad_sampling_value_fails_its_line_only(tmp_path, field):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"good{i}", "prompt": f"p{i}"}) + "\n" for i in range(10))
                   + json.dumps({"id": "bad", "prompt": "x", **field}) + "\n")
    llm = FakeLLM()
    summary = run_batch(llm, inp, tmp_path / "out.jsonl", DEFAULTS, progress=False)
    records = {r["id"]: r for r in _records(tmp_path / "out.jsonl")}
    key = next(iter(field))
    assert key in records["bad"]["error"] and records["bad"]["line"] == 11
    assert all("error" not in records[f"good{i}"] for i in range(10))
    assert summary["ok"] == 10 and summary["failed"] == 1
    assert all(p != "x" for p, _ in llm.submitted)  # the cluster never saw the bad line's values


def test_infinite_temperature_is_refused(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "x", "temperature": Infinity}\n{"id": 2, "prompt": "y", "top_p": NaN}\n')
    run_batch(FakeLLM(), inp, tmp_path / "out.jsonl", DEFAULTS, progress=False)
    errors = {r["id"]: r["error"] for r in _records(tmp_path / "out.jsonl")}
    assert "temperature must be a finite number" in errors[1] and "top_p" in errors[2]


def test_bad_messages_fail_their_line_only(tmp_path):
    inp = _write(tmp_path / "in.jsonl",
                 {"id": "n", "messages": [{"role": "user", "content": 5}]},
                 {"id": "r", "messages": [{"role": "robot", "content": "hi"}]},
                 {"id": "e", "messages": []},
                 '{"id": "s", "messages": [{"role": "user", "content": "\\ud800"}]}',
                 {"id": "ok", "messages": [{"role": "user", "content": "hi"}]})
    run_batch(FakeLLM(), inp, tmp_path / "out.jsonl", DEFAULTS, progress=False)
    records = {r["id"]: r for r in _records(tmp_path / "out.jsonl")}
    assert "content must be a string" in records["n"]["error"] and "role" in records["r"]["error"]
    assert "non-empty" in records["e"]["error"] and "surrogate" in records["s"]["error"]
    assert records["ok"]["text"] == "text:hi"


def test_undecodable_line_bom_and_id_types(tmp_path):
    lines = [b"\xef\xbb\xbf" + json.dumps({"id": "first", "prompt": "a"}).encode(),
             json.dumps({"id": 1, "prompt": "int one"}).encode(),
             json.dumps({"id": "1", "prompt": "string one"}).encode(),
             b'{"id": "latin", "prompt": "caf\xe9"}',
             b"{broken",
             json.dumps({"id": "line-5", "prompt": "a real id"}).encode(),
             json.dumps({"id": True, "prompt": "bool id"}).encode()]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    summary = run_batch(FakeLLM(), inp, tmp_path / "out.jsonl", DEFAULTS, progress=False)
    records = _records(tmp_path / "out.jsonl")
    good = {json.dumps(r["id"]): r for r in records if "text" in r}
    assert set(good) == {'"first"', "1", '"1"', '"line-5"'}
    assert good["1"]["text"] == "text:int one" and good['"1"']["text"] == "text:string one"
    errors = sorted((r["line"], r["id"]) for r in records if "error" in r)
    assert errors == [(4, None), (5, None), (7, None)]
    assert "UTF-8" in next(r["error"] for r in records if r.get("line") == 4)
    assert summary["ok"] == 4 and summary["failed"] == 3


def test_rerun_retries_failures_and_skips_successes(tmp_path):
    inp = _write(tmp_path / "in.jsonl", *({"id": i, "prompt": f"p{i}"} for i in range(4)),
                 {"id": 4, "prompt": "x", "top_k": 2.5})
    out = tmp_path / "out.jsonl"
    first = run_batch(FakeLLM(fail={"p1", "p2"}), inp, out, DEFAULTS, progress=False)
    assert first["ok"] == 2 and first["failed"] == 3
    _write(inp, *({"id": i, "prompt": f"p{i}"} for i in range(4)), {"id": 4, "prompt": "x", "top_k": 2})  # fixed
    llm = FakeLLM()
    second = run_batch(llm, inp, out, DEFAULTS, progress=False)
    assert sorted(p for p, _ in llm.submitted) == ["p1", "p2", "x"]
    assert second["already_done"] == 2 and second["retried"] == 3 and second["ok"] == 3
    last = {}
    for r in _records(out):  # the last record of an id is its state
        last[r["id"]] = r
    assert all("text" in r for r in last.values()) and sorted(last) == [0, 1, 2, 3, 4]
    third = run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    assert third["already_done"] == 5 and third["ok"] == third["failed"] == 0


def test_a_torn_last_record_is_repaired(tmp_path):
    inp = _write(tmp_path / "in.jsonl", *({"id": i, "prompt": f"p{i}"} for i in range(3)))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 0, "text": "kept", "output_ids": []}) + "\n" + '{"id": 1, "te')
    summary = run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    records = _records(out)
    assert [r["id"] for r in records] == [0, 1, 2] and records[0]["text"] == "kept"
    assert summary["already_done"] == 1


class SlowFirstLLM(FakeLLM):
    """Request 0 finishes only once every line has been submitted (or after 5 s): a batch that waits
    on it before refilling never gets there."""

    def __init__(self, total: int, output: Path):
        super().__init__()
        self.total, self.output, self.all_submitted = total, output, threading.Event()

    def submit(self, prompt, params):
        rid = super().submit(prompt, params)
        if len(self.submitted) == self.total:
            self.all_submitted.set()
        return rid

    def result(self, rid):
        if rid == 0:
            self.waited = self.all_submitted.wait(5.0)
            self.written_meanwhile = self.output.read_bytes().count(b"\n")  # complete records
        return super().result(rid)


def test_a_long_request_does_not_hold_back_the_others(tmp_path):
    inp = _write(tmp_path / "in.jsonl", *({"id": i, "prompt": f"p{i}"} for i in range(10)))
    out = tmp_path / "out.jsonl"
    llm = SlowFirstLLM(10, out)
    summary = run_batch(llm, inp, out, DEFAULTS, max_in_flight=3, progress=False)
    assert llm.waited  # the other nine were submitted while request 0 ran: in flight stayed at 3
    assert llm.written_meanwhile >= 7  # and those that finished were on disk before it
    records = _records(out)
    assert sorted(r["id"] for r in records) == list(range(10)) and summary["ok"] == 10
    assert records[0]["id"] != 0  # completion order, not input order
    again = run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)  # resume keys by id, whatever the order
    assert again["already_done"] == 10 and again["ok"] == again["failed"] == 0


class RaisingLLM(FakeLLM):
    def result(self, rid):
        if self.submitted[rid][0] == "boom":
            raise RuntimeError("the stream ended without a result")
        return super().result(rid)


def test_a_result_that_raises_fails_its_line_only(tmp_path):
    inp = _write(tmp_path / "in.jsonl", {"id": "a", "prompt": "p"}, {"id": "b", "prompt": "boom"},
                 {"id": "c", "prompt": "q"})
    summary = run_batch(RaisingLLM(), inp, tmp_path / "out.jsonl", DEFAULTS, progress=False)
    records = {r["id"]: r for r in _records(tmp_path / "out.jsonl")}
    assert "without a result" in records["b"]["error"] and records["b"]["line"] == 2
    assert records["a"]["text"] == "text:p" and records["c"]["text"] == "text:q"
    assert summary["ok"] == 2 and summary["failed"] == 1
    assert summary["cluster_failed"] == 1  # not the line's input: the command exits 1 (a re-run retries it)


def test_a_number_too_long_or_nesting_too_deep_fails_its_line_only(tmp_path):
    lines = ['{"id": ' + "7" * 5000 + ', "prompt": "long id"}',
             "[" * 100_000 + "]" * 100_000,
             '{"id": "deep", "prompt": "x", "stop": ' + "[" * 100_000 + "]" * 100_000 + "}",
             '{"id": "seed", "prompt": "x", "seed": ' + "1" * 5000 + "}",
             json.dumps({"id": "ok", "prompt": "fine"})]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    summary = run_batch(FakeLLM(), inp, tmp_path / "out.jsonl", DEFAULTS, progress=False)
    assert summary["cluster_failed"] == 0  # bad input alone: the command exits 0
    records = _records(tmp_path / "out.jsonl")
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert sorted(errors) == [1, 2, 3, 4] and all(r["id"] is None for r in records if "error" in r)
    assert "4300 digits" in errors[1] and "as strings" in errors[1] and "too deeply" in errors[2]
    assert [r["id"] for r in records if "text" in r] == ["ok"] and summary["ok"] == 1 and summary["failed"] == 4


def test_logprobs_are_written(tmp_path):
    inp = _write(tmp_path / "in.jsonl", {"id": "two", "prompt": "ab", "logprobs": 2}, {"id": "none", "prompt": "c"})
    out = tmp_path / "out.jsonl"
    run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    records = {r["id"]: r for r in _records(out)}
    two = records["two"]
    assert two["token_logprobs"] == [-0.25, -0.5, -0.75, -1.0]  # one per output id, the picked token's
    assert two["top_logprobs"] == [[[2, -0.25 * i], [3, -0.25 * i - 1]] for i in range(1, 5)]
    assert len(two["top_logprobs"]) == len(two["output_ids"])
    assert "token_logprobs" not in records["none"] and "top_logprobs" not in records["none"]
    out.unlink()
    run_batch(FakeLLM(), inp, out, SamplingParams(temperature=0, max_new_tokens=4, logprobs=1), progress=False)
    records = {r["id"]: r for r in _records(out)}  # --logprobs 1 for every line, 2 where a line says so
    assert [len(p) for p in records["none"]["top_logprobs"]] == [1] * 4 and records["none"]["token_logprobs"]
    assert [len(p) for p in records["two"]["top_logprobs"]] == [2] * 4


def test_a_last_record_without_its_newline_is_kept_and_completed(tmp_path):
    inp = _write(tmp_path / "in.jsonl", *({"id": i, "prompt": f"p{i}"} for i in range(3)))
    out = tmp_path / "out.jsonl"
    kept = json.dumps({"id": 0, "text": "kept", "output_ids": []})
    out.write_text(kept)  # killed between the record and its newline
    first = run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    text = out.read_text()
    assert text.startswith(kept + "\n") and text.endswith("\n")
    assert sorted(r["id"] for r in _records(out)) == [0, 1, 2] and first["already_done"] == 1
    out.write_text(text + json.dumps({"id": 9, "line": 9, "error": "x"}))  # an error record, unterminated
    second = run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    assert second["already_done"] == 3 and len(_records(out)) == 4


def test_an_invalid_line_never_claims_an_id_that_a_valid_line_has(tmp_path):
    inp = _write(tmp_path / "in.jsonl", {"id": 7, "prompt": 5}, {"id": 7, "prompt": "fixed below"},
                 {"id": 8, "prompt": "valid first"}, {"id": 8, "prompt": 5},
                 {"id": 9, "prompt": 5}, {"id": 9, "temperature": -1})
    out = tmp_path / "out.jsonl"
    llm = FakeLLM()
    summary = run_batch(llm, inp, out, DEFAULTS, progress=False)
    records = _records(out)
    assert sorted(r["id"] for r in records) == [7, 8, 9]  # one record per id
    by_id = {r["id"]: r for r in records}
    assert by_id[7]["text"] == "text:fixed below" and by_id[8]["text"] == "text:valid first"
    assert by_id[9]["line"] == 5 and "prompt" in by_id[9]["error"]  # no valid line: the first error
    assert summary["ok"] == 2 and summary["failed"] == 1 and summary["duplicate_ids"] == 3
    again = run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    assert again["already_done"] == 4 and again["retried"] == 1 and again["failed"] == 1  # lines of done ids


def test_a_line_without_an_id_is_reported_once(tmp_path):
    inp = _write(tmp_path / "in.jsonl", "{broken", {"prompt": "no id"}, {"id": 1, "prompt": "p"})
    out = tmp_path / "out.jsonl"
    run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    before = out.read_bytes()
    again = run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    assert out.read_bytes() == before and again["already_done"] == 3 and again["failed"] == 0
    _write(inp, "{broken", {"prompt": "no id"}, {"id": 1, "prompt": "p"}, "[still no id]")  # a new bad line
    third = run_batch(FakeLLM(), inp, out, DEFAULTS, progress=False)
    nulls = [(r["line"], r["id"]) for r in _records(out) if "error" in r]
    assert nulls == [(1, None), (2, None), (4, None)] and third["failed"] == 1

"""``raymoe batch``: generation for a JSON-lines file of prompts, resumable, as a plain command or a
Ray job (``ray job submit --working-dir . -- raymoe batch ...``).

Input lines: ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [...]}``, with optional
per-line sampling fields (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``, ``seed``,
``stop``, ``logprobs``, ...). Output lines: ``{"id", "text", "output_ids", "prompt_tokens",
"completion_tokens", "finish_reason"}`` or ``{"id", "line", "error"}``. With ``logprobs`` K > 0 a
result also has ``token_logprobs`` (the logprob of each generated token, in ``output_ids`` order) and
``top_logprobs`` (per generated position, K ``[token_id, logprob]`` pairs, best first), the shape of
``raymoe generate --json``: token ids, not token texts, so that nothing is lost to decoding.
Each line is written (and flushed to disk) as soon as its request finishes, whichever request in
flight that is, so the file is in completion order, not input order, and a killed run loses no
finished request.

What a batch guarantees:
- nothing it did not write is ever truncated or overwritten: ``--output`` must be a new file, an empty
  one, or a results file of an earlier run (checked before the cluster starts);
- every id gets one record per run, bad lines included; when several lines share an id the first
  valid one runs (an invalid line never claims an id that a valid line has) and the others count as
  duplicates; a line with no usable id gets ``"id": null`` and its line number, so an error never
  takes a real id's place; ids keep their JSON type (``1`` and ``"1"`` are two ids);
- a re-run with the same output skips the ids whose last record is a success and retries the others
  (engine failures and fixed input lines alike): for each id, the last record in the file is its state.
  A line without a usable id is reported once: a re-run skips line numbers that already have a
  ``"id": null`` record.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from model.sampling import SamplingParams

BOM = b"\xef\xbb\xbf"
ROLES = ("system", "user", "assistant")


class BatchError(ValueError):
    """A batch that must not start (bad paths, an output that is not ours): one line naming the fix."""


@dataclass
class BatchItem:
    line: int
    id: str | int | float | None  # as given in the input (written back unchanged); None: no usable id
    prompt: str | list | None = None
    params: SamplingParams | None = None
    error: str | None = None

    @property
    def key(self) -> str | None:
        """Ids keep their JSON type: ``1`` and ``"1"`` are different ids."""
        return None if self.id is None else id_key(self.id)


def id_key(rid) -> str:
    return json.dumps(rid)


def _usable_id(rid) -> bool:
    if isinstance(rid, bool) or not isinstance(rid, (str, int, float)):
        return False
    if isinstance(rid, float) and not math.isfinite(rid):
        return False
    return not isinstance(rid, str) or _is_text(rid)


def _is_text(s: str) -> bool:
    """A string that can be written as UTF-8 (JSON's ``\\ud800`` escapes can make lone surrogates)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_messages(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"messages[{i}] must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"messages[{i}].role must be one of {list(ROLES)}, got {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"messages[{i}].content must be a string, got {type(m['content']).__name__}"
        if not _is_text(m["content"]):
            return f"messages[{i}].content holds an invalid character (a lone surrogate)"
    return None


def parse_line(raw: bytes, number: int, defaults: SamplingParams) -> BatchItem:
    """One input line (bytes, without its newline) -> an item to run, or one carrying the error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BatchItem(number, None, error=f"line {number} is not valid UTF-8 (byte {e.start} of the line); "
                                             "save the file as UTF-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BatchItem(number, None, error=f"line {number} is not valid JSON ({e.msg}); fix or remove it")
    except ValueError as e:  # an integer of more digits than Python converts (4300 by default)
        return BatchItem(number, None, error=f"line {number} cannot be read ({str(e).split(';')[0]}); "
                                             "write long numbers, ids included, as strings")
    except RecursionError:
        return BatchItem(number, None, error=f"line {number} nests arrays or objects too deeply to read; "
                                             "fix or remove it")
    if not isinstance(obj, dict):
        return BatchItem(number, None, error=f"line {number} must be a JSON object with an id")
    rid = obj.pop("id", None)
    if not _usable_id(rid):
        return BatchItem(number, None, error=f"line {number} has no usable 'id' (a string or a number)")
    prompt, messages = obj.pop("prompt", None), obj.pop("messages", None)
    if (prompt is None) == (messages is None):
        return BatchItem(number, rid, error="give exactly one of 'prompt' (text) or 'messages' (a chat)")
    if prompt is not None and not (isinstance(prompt, str) and _is_text(prompt)):
        return BatchItem(number, rid, error="'prompt' must be a string of valid text")
    problem = _check_messages(messages) if messages is not None else None
    if problem:
        return BatchItem(number, rid, error=problem)
    try:
        fields = asdict(defaults)
        fields.update(obj)
        params = SamplingParams.from_dict(fields)
    except (TypeError, ValueError) as e:
        return BatchItem(number, rid, error=f"bad sampling field: {e}")
    return BatchItem(number, rid, prompt if prompt is not None else messages, params)


def read_input(path: Path, defaults: SamplingParams):
    """Yields an item per non-blank line, read line by line (one bad line never rejects the file)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if raw.strip():
                yield parse_line(raw, number, defaults)


def _is_record(obj) -> bool:
    return isinstance(obj, dict) and "id" in obj and ("text" in obj or "error" in obj)


@dataclass
class OutputState:
    """What an existing results file holds."""
    ok: dict[str, bool] = field(default_factory=dict)  # id key -> whether its last record is a success
    null_lines: set[int] = field(default_factory=set)  # input lines recorded with "id": null (no usable id)
    good: int = 0  # byte length of the complete records
    terminated: bool = True  # whether the complete records end in a newline


def scan_output(output: Path) -> OutputState:
    """The state of an existing results file. Raises ``BatchError`` when the file is not a results
    file (it is never truncated then). A torn last record (a killed run) is the only thing dropped."""
    state = OutputState()
    if not output.exists():
        return state
    lines = output.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        if last and not raw.strip():
            break
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        if not _is_record(obj):
            if last and raw.startswith(b'{"id": '):  # our own write, cut short by a kill
                break
            raise BatchError(f"--output {output} exists and is not a raymoe results file (line {number} is not a "
                             "result record); choose a new --output path (raymoe never overwrites other files)")
        if obj["id"] is not None:
            state.ok[id_key(obj["id"])] = "error" not in obj
        elif isinstance(obj.get("line"), int):
            state.null_lines.add(obj["line"])
        state.good += len(raw) + (0 if last else 1)
        state.terminated = not last
    return state


def repair_output(output: Path, state: OutputState) -> None:
    """Make an earlier run's results file safe to append to. A torn last record (a write cut short:
    not JSON) is truncated; a last record that is complete but lacks its newline (the kill came
    between the two) is kept and its line completed with a newline."""
    if not output.exists():
        return
    if output.stat().st_size > state.good:
        with output.open("r+b") as f:
            f.truncate(state.good)
    if not state.terminated:
        with output.open("ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


def check_paths(input_path: Path, output_path: Path) -> None:
    """Refuse, before anything is written or started, a batch that would lose data or cannot write."""
    if not input_path.is_file():
        raise BatchError(f"--input {input_path} does not exist or is not a file")
    if not os.access(input_path, os.R_OK):
        raise BatchError(f"--input {input_path} is not readable")
    if output_path.is_dir():
        raise BatchError(f"--output {output_path} is a directory; give a file path")
    if output_path.exists() and os.path.samefile(input_path, output_path):
        raise BatchError(f"--output {output_path} is the input file; give a different path for the results")
    parent = output_path.resolve().parent
    if not parent.is_dir():
        raise BatchError(f"--output {output_path}: the folder {parent} does not exist")
    if not os.access(output_path if output_path.exists() else parent, os.W_OK):
        raise BatchError(f"--output {output_path} is not writable")
    scan_output(output_path)


def _dumps(record: dict) -> str:
    try:
        line = json.dumps(record, ensure_ascii=False)
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:  # lone surrogates in user text quoted in an error: escape them
        return json.dumps(record, ensure_ascii=True)


def _error_text(e: Exception) -> str:
    return str(e) or type(e).__name__


class Completions:
    """Requests in flight, handed back in the order they finish. ``llm.result`` blocks until its
    request is done, so one daemon thread per request waits on it and puts the outcome (the result,
    or the exception it raised) on one queue; ``next`` takes whichever finished first."""

    def __init__(self, llm):
        self.llm = llm
        self.items: dict[int, BatchItem] = {}  # request id -> its line
        self.finished: queue.Queue = queue.Queue()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, request_id: int, item: BatchItem) -> None:
        self.items[request_id] = item
        threading.Thread(target=self._wait, args=(request_id,), name=f"batch-wait-{request_id}", daemon=True).start()

    def _wait(self, request_id: int) -> None:
        try:
            outcome = self.llm.result(request_id)
        except Exception as e:  # noqa: BLE001 - handed to the batch loop, which fails this line only
            outcome = e
        self.finished.put((request_id, outcome))

    def next(self):
        """Blocks until a request finishes: ``(item, GenerationResult or Exception)``."""
        request_id, outcome = self.finished.get()
        return self.items.pop(request_id), outcome


def _result_record(item: BatchItem, result) -> dict:
    record = {"id": item.id, "text": result.text, "output_ids": result.output_ids,
              "prompt_tokens": len(result.prompt_ids), "completion_tokens": len(result.output_ids),
              "finish_reason": result.finish_reason}
    if item.params.logprobs:
        record["token_logprobs"] = list(result.token_logprobs)
        record["top_logprobs"] = list(result.top_logprobs)
    return record


def select_items(items: list[BatchItem], state: OutputState) -> tuple[list[BatchItem], dict]:
    """The lines this run does, and the counts for its summary. An id done in the output is skipped;
    of the lines sharing an id the first valid one runs (an invalid line runs, as its error record,
    only when no line with its id is valid); a line with no usable id already reported is skipped."""
    done = {k for k, ok in state.ok.items() if ok}
    valid = {item.key for item in items if item.key is not None and not item.error}
    todo, seen, duplicates, skipped = [], set(), 0, 0
    for item in items:
        if item.key is None:
            if item.line in state.null_lines:
                skipped += 1
                continue
        elif item.key in done:
            skipped += 1
            continue
        elif item.key in seen or (item.error and item.key in valid):  # one record per id; repeats: summary only
            duplicates += 1
            continue
        else:
            seen.add(item.key)
        todo.append(item)
    return todo, {"lines": len(items), "already_done": skipped, "retried": sum(1 for k in seen if k in state.ok),
                  "duplicate_ids": duplicates}


def run_batch(llm, input_path: Path, output_path: Path, defaults: SamplingParams, max_in_flight: int = 64,
              progress: bool = True) -> dict:
    check_paths(input_path, output_path)
    state = scan_output(output_path)
    repair_output(output_path, state)
    items, summary = select_items(list(read_input(input_path, defaults)), state)
    summary.update(ok=0, failed=0, cluster_failed=0, tokens=0)  # failed: every error record; cluster_failed: those
    # the cluster failed (lost actors past recovery, ...), not the line's input
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), desc="batch", unit="req", disable=not progress, file=sys.stderr,
               mininterval=1.0)
    with output_path.open("a", encoding="utf-8") as out:
        def write(record: dict):
            out.write(_dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
            summary["ok" if "error" not in record else "failed"] += 1
            bar.update()
            bar.set_postfix(tok_s=f"{summary['tokens'] / max(time.perf_counter() - t0, 1e-9):.1f}")

        in_flight = Completions(llm)
        todo = deque(items)
        while todo or in_flight:
            while todo and len(in_flight) < max_in_flight:
                item = todo.popleft()
                if item.error:
                    write({"id": item.id, "line": item.line, "error": item.error})
                    continue
                try:
                    in_flight.add(llm.submit(item.prompt, item.params), item)
                except Exception as e:  # noqa: BLE001 - it fails its own line, never the batch
                    # a ValueError is the line's input (a prompt past the context, say); else the cluster's
                    summary["cluster_failed"] += not isinstance(e, ValueError)
                    write({"id": item.id, "line": item.line, "error": _error_text(e)})
            if not in_flight:
                continue
            item, result = in_flight.next()  # whichever finished first; the loop then refills
            error = _error_text(result) if isinstance(result, Exception) else result.error
            if error:  # failed in the cluster, not for its input
                summary["cluster_failed"] += 1
                write({"id": item.id, "line": item.line, "error": error})
            else:
                summary["tokens"] += len(result.output_ids)
                write(_result_record(item, result))
    bar.close()
    summary["seconds"] = time.perf_counter() - t0
    summary["tokens_per_s"] = summary["tokens"] / summary["seconds"] if summary["seconds"] else 0.0
    return summary


def main(args) -> int:
    from cluster.api import RayMoE
    from cluster.options import layout_overrides, model_dir, sampling_from

    input_path, output_path = Path(args.input), Path(args.output)
    check_paths(input_path, output_path)  # before the cluster starts
    defaults = sampling_from(args)
    print("starting the cluster ...", file=sys.stderr, flush=True)
    with RayMoE.start(model_dir(args), args.layout, address=args.address, **layout_overrides(args)) as llm:
        summary = run_batch(llm, input_path, output_path, defaults, progress=not args.no_progress)
    print(f"batch done: {summary['ok']} ok, {summary['failed']} failed, {summary['already_done']} already done "
          f"(skipped), {summary['retried']} retried, {summary['duplicate_ids']} duplicate ids ignored, "
          f"{summary['tokens']} tokens in "
          f"{summary['seconds']:.1f} s = {summary['tokens_per_s']:.1f} tokens/s; results in {output_path}", flush=True)
    if summary["cluster_failed"]:  # the run (a Ray job's status) fails; a re-run retries just those lines
        print(f"error: {summary['cluster_failed']} line(s) failed in the cluster, not for their input; run the same "
              "command again to retry them", file=sys.stderr)
        return 1
    return 0

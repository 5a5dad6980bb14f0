"""``raymoe batch``: generation for a JSON-lines file of prompts, resumable, as a plain command or a
Ray job (``ray job submit --working-dir . -- raymoe batch ...``).

Input lines: ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [...]}``, with optional
per-line sampling fields (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``, ``seed``,
``stop``, ...). Output lines: ``{"id", "text", "output_ids", "prompt_tokens", "completion_tokens",
"finish_reason"}`` or ``{"id", "error"}``. Each line is written (and flushed to disk) when its
request finishes, so a killed run loses nothing written; a re-run skips ids already in the output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from model.sampling import SamplingParams


@dataclass
class BatchItem:
    id: str | int  # as given in the input (written back unchanged)
    prompt: str | list | None = None
    params: SamplingParams | None = None
    error: str | None = None


def parse_line(line: str, number: int, defaults: SamplingParams) -> BatchItem:
    """One input line -> an item to run, or an item carrying the error that names the problem."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return BatchItem(f"line-{number}", error=f"line {number} is not valid JSON ({e.msg}); fix or remove it")
    if not isinstance(obj, dict):
        return BatchItem(f"line-{number}", error=f"line {number} must be a JSON object with an id")
    rid = obj.pop("id", None)
    if rid is None or isinstance(rid, (dict, list)):
        return BatchItem(f"line-{number}", error=f"line {number} has no usable 'id' (a string or number)")
    prompt, messages = obj.pop("prompt", None), obj.pop("messages", None)
    if (prompt is None) == (messages is None):
        return BatchItem(rid, error="give exactly one of 'prompt' (text) or 'messages' (a chat)")
    if prompt is not None and not isinstance(prompt, str):
        return BatchItem(rid, error="'prompt' must be a string")
    if messages is not None and not (isinstance(messages, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        return BatchItem(rid, error="'messages' must be a list of {role, content} objects")
    try:
        fields = asdict(defaults)
        fields.update(obj)
        params = SamplingParams.from_dict(fields)
    except (TypeError, ValueError) as e:
        return BatchItem(rid, error=f"bad sampling field: {e}")
    return BatchItem(rid, prompt if prompt is not None else messages, params)


def done_ids(output: Path) -> set[str]:
    """Ids already answered in ``output`` (a torn last line from a killed run is dropped)."""
    if not output.exists():
        return set()
    ids, good = set(), 0
    with output.open("rb") as f:
        data = f.read()
    for raw in data.splitlines(keepends=True):
        try:
            ids.add(str(json.loads(raw)["id"]))
            good += len(raw)
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            break
    if good < len(data):  # truncate a partial line so appends start on a fresh line
        with output.open("r+b") as f:
            f.truncate(good)
    return ids


def run_batch(llm, input_path: Path, output_path: Path, defaults: SamplingParams, max_in_flight: int = 64,
              progress: bool = True) -> dict:
    already = done_ids(output_path)
    lines = input_path.read_text().splitlines()
    items, seen, duplicates = [], set(), 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item = parse_line(line, number, defaults)
        key = str(item.id)
        if key in already:
            continue
        if key in seen:  # one output line per id: later repeats are reported in the summary only
            duplicates += 1
            continue
        seen.add(key)
        items.append(item)
    summary = {"lines": len(lines), "already_done": len(already), "duplicate_ids": duplicates, "ok": 0,
               "failed": 0, "tokens": 0}
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), desc="batch", unit="req", disable=not progress, file=sys.stderr,
               mininterval=1.0)
    with output_path.open("a") as out:
        def write(record: dict):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            summary["ok" if "error" not in record else "failed"] += 1
            bar.update()
            bar.set_postfix(tok_s=f"{summary['tokens'] / max(time.perf_counter() - t0, 1e-9):.1f}")

        in_flight: dict[int, BatchItem] = {}
        queue = list(items)
        while queue or in_flight:
            while queue and len(in_flight) < max_in_flight:
                item = queue.pop(0)
                if item.error:
                    write({"id": item.id, "error": item.error})
                    continue
                try:
                    in_flight[llm.submit(item.prompt, item.params)] = item
                except ValueError as e:
                    write({"id": item.id, "error": str(e)})
            if not in_flight:
                continue
            request_id = next(iter(in_flight))
            item = in_flight.pop(request_id)
            result = llm.result(request_id)
            if result.error:
                write({"id": item.id, "error": result.error})
            else:
                summary["tokens"] += len(result.output_ids)
                write({"id": item.id, "text": result.text, "output_ids": result.output_ids,
                       "prompt_tokens": len(result.prompt_ids), "completion_tokens": len(result.output_ids),
                       "finish_reason": result.finish_reason})
    bar.close()
    summary["seconds"] = time.perf_counter() - t0
    summary["tokens_per_s"] = summary["tokens"] / summary["seconds"] if summary["seconds"] else 0.0
    return summary


def main(args) -> int:
    from cluster.api import RayMoE
    from cluster.cli import _layout_overrides, _model_dir, _sampling_from

    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.exists():
        raise FileNotFoundError(f"--input {input_path} does not exist")
    defaults = _sampling_from(args)
    with RayMoE.start(_model_dir(args), args.layout, address=args.address, **_layout_overrides(args)) as llm:
        summary = run_batch(llm, input_path, output_path, defaults, progress=not args.no_progress)
    print(f"batch done: {summary['ok']} ok, {summary['failed']} failed, {summary['already_done']} already done "
          f"(skipped), {summary['duplicate_ids']} duplicate ids ignored, {summary['tokens']} tokens in "
          f"{summary['seconds']:.1f} s = {summary['tokens_per_s']:.1f} tokens/s; results in {output_path}", flush=True)
    return 0

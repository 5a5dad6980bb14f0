"""The engine: drives lockstep steps over the actors and turns sampled tokens into streamed text.

Each step reads as three lines: schedule, run, post-process. Runs in a background thread of the
process that owns the cluster handle; ``submit``/``cancel`` may be called from any thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import ray

from actors.messages import ChunkPlan, StepPlan
from cluster.scheduler import Scheduler
from model.sampling import SamplingParams, with_seed
from model.sequence import GenerationResult, Sequence

log = logging.getLogger("raymoe.engine")


@dataclass
class StreamEvent:
    text: str  # new text, safe to show (never a broken character, never part of a stop string)
    token_ids: list[int]  # new token ids
    finished: bool = False
    result: GenerationResult | None = None


class Request:
    def __init__(self, seq: Sequence):
        self.seq = seq
        self.events: queue.Queue[StreamEvent] = queue.Queue()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.sent_params = False
        self.error: str | None = None


class Engine:
    def __init__(self, attention_actors, expert_actors, router, scheduler: Scheduler, tokenizer, eos_token_id,
                 max_len: int, step_timeout_s: float = 600.0, rebuild=None, max_recoveries: int = 3):
        """``rebuild()``: replace every data-plane actor after a failure (an actor died, a collective timed
        out) and return the new (attention, expert) actors; requests in flight are then re-run from
        their token history."""
        self.attention, self.experts, self.router = attention_actors, expert_actors, router
        self.scheduler, self.tokenizer, self.eos_token_id, self.max_len = scheduler, tokenizer, eos_token_id, max_len
        self.step_timeout_s = step_timeout_s
        self.rebuild, self.max_recoveries = rebuild, max_recoveries
        self.requests: dict[int, Request] = {}
        self._release: dict[int, list[int]] = defaultdict(list)  # shard -> seq ids to release
        self._cancel: list[int] = []
        self._next_id = 0
        self._cv = threading.Condition()
        self._stopping = False
        self.totals = defaultdict(float)  # tokens, steps, seconds per phase, ...
        self.recent: list[tuple[float, int]] = []  # (time, tokens generated) per step
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self._finished_reasons: dict[str, int] = defaultdict(int)  # since the last report to the router
        self._finished_order: list[int] = []
        self.keep_finished = 10_000  # finished requests kept for late readers of their stream
        self._prompt_tokens_done = 0
        self._thread = threading.Thread(target=self._loop, name="raymoe-engine", daemon=True)
        self._thread.start()

    # public, thread-safe
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        with self._cv:
            seq_id = self._next_id
            seq = Sequence(seq_id, prompt_ids, with_seed(params), self.tokenizer, self.eos_token_id, self.max_len)
            self.scheduler.add(seq_id, len(seq.prompt_ids), len(seq.prompt_ids) + seq.max_new)
            self._next_id += 1
            self.requests[seq_id] = Request(seq)
            self._cv.notify()
            return seq_id

    def events(self, seq_id: int):
        req = self.requests.get(seq_id)
        if req is None:
            raise KeyError(f"no request {seq_id}")
        while True:
            ev = req.events.get()
            yield ev
            if ev.finished:
                return

    def cancel(self, seq_id: int) -> None:
        with self._cv:
            self._cancel.append(seq_id)
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # the loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._cancel and not self.scheduler.has_work():
                    self._cv.wait()
                if self._stopping:
                    break
                self._apply_cancels()
                chunks = self.scheduler.schedule()
                plans = self._plans(chunks)
            if not any(p.chunks for p in plans):
                time.sleep(0.01)
                continue
            try:
                outputs = self._run(plans)
            except Exception as e:  # noqa: BLE001 - recover (or fail the requests), the engine goes on
                log.warning("step failed: %s", e)
                if not self._recover(e):
                    with self._cv:
                        self._fail_all(f"step failed: {e}")
                continue
            with self._cv:
                self._post_process(chunks, outputs)
        with self._cv:
            self._fail_all("the engine stopped")

    def _apply_cancels(self) -> None:
        for seq_id in self._cancel:
            req = self.requests.get(seq_id)
            if req is not None and not req.seq.finished:
                req.seq.finish_reason = "cancelled"
                self._finish(req)
        self._cancel.clear()

    def _plans(self, chunks) -> list[StepPlan]:
        plans = []
        for shard, shard_chunks in enumerate(chunks):
            plan = StepPlan(release=self._release.pop(shard, []))
            for c in shard_chunks:
                req = self.requests[c.seq_id]
                params = None if req.sent_params else req.seq.params
                req.sent_params = True
                plan.chunks.append(ChunkPlan(c.seq_id, req.seq.all_ids[c.start:c.end], c.start,
                                             list(c.block_table), c.sample, params))
            plans.append(plan)
        return plans

    def _recover(self, error: Exception) -> bool:
        """Rebuild the data plane and re-queue every running request for recomputation. No accepted
        request is lost or duplicated: the failed step's samples were never recorded."""
        if self.rebuild is None or self.totals["recoveries"] >= self.max_recoveries:
            return False
        with self._cv:
            self.scheduler.requeue_all()
            self._release.clear()
            for req in self.requests.values():
                req.sent_params = False
        try:
            self.attention, self.experts = self.rebuild()
        except Exception:  # noqa: BLE001 - a failed rebuild fails the requests instead
            log.exception("rebuilding the cluster failed")
            return False
        self.totals["recoveries"] += 1
        log.warning("cluster rebuilt after: %s; requests in flight are recomputed", error)
        return True

    def _run(self, plans: list[StepPlan]):
        t0 = time.perf_counter()
        attn_refs = [a.step.remote(p) for a, p in zip(self.attention, plans, strict=True)]
        expert_refs = [e.step.remote() for e in self.experts]
        # fail fast: the first actor that dies ends the step (its peers may be stuck in a collective)
        pending = attn_refs + expert_refs
        deadline = t0 + self.step_timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                raise TimeoutError(f"a step took longer than {self.step_timeout_s:.0f} s")
            ray.get(ready[0])
        outputs = ray.get(attn_refs)
        expert_outputs = ray.get(expert_refs)
        self.totals["step_seconds"] += time.perf_counter() - t0
        for out in outputs:
            for phase, s in out.seconds.items():
                self.totals[f"attention.{phase}"] += s
        for out in expert_outputs:
            for phase, s in out.seconds.items():
                self.totals[f"expert.{phase}"] += s
        return outputs

    def _post_process(self, chunks, outputs) -> None:
        t0 = time.perf_counter()
        self.scheduler.computed(chunks)
        now = time.perf_counter()
        load: dict[int, list[int]] = {}
        sampled = []
        for out in outputs:
            for layer, counts in out.load.items():
                load[layer] = [a + b for a, b in zip(load.get(layer, [0] * len(counts)), counts, strict=True)]
            sampled += [(self.requests.get(seq_id), token, top) for seq_id, (token, top) in out.sampled.items()]
        sampled = [(req, token, top) for req, token, top in sampled if req is not None and not req.seq.finished]
        n_ttft, n_tpot = len(self.ttft), len(self.tpot)
        # figures first, so that a reader woken by the events below sees them
        self.totals["steps"] += 1
        self.totals["tokens_generated"] += len(sampled)
        self.totals["tokens_computed"] += sum(o.num_tokens for o in outputs)
        self.recent.append((now, len(sampled)))
        del self.recent[:-200]
        for req, token, top in sampled:
            if req.first_token_at is None:
                req.first_token_at = now
                self.ttft.append(now - req.submitted)
            piece = req.seq.append(token, top)
            self.scheduler.appended(req.seq.seq_id)
            req.events.put(StreamEvent(piece, [token]))
            if req.seq.finished:
                self._finish(req)
        phases = defaultdict(float)
        for out in outputs:
            for phase, s in out.seconds.items():
                phases[phase] += s
        self.router.record_step.remote({
            "load": load, "tokens_generated": len(sampled), "ttft": self.ttft[n_ttft:], "tpot": self.tpot[n_tpot:],
            "finished": self._drain_finished(), "prompt_tokens": self._drain_prompt_tokens(),
            "shards": [{"shard": i, "waiting": len(sh.waiting), "running": len(sh.running),
                        "blocks_used": self.scheduler.blocks_used(i)} for i, sh in enumerate(self.scheduler.shards)],
            "phases": dict(phases),
        })
        self.totals["scheduler_seconds"] += time.perf_counter() - t0

    def _drain_finished(self) -> dict[str, int]:
        out, self._finished_reasons = dict(self._finished_reasons), defaultdict(int)
        return out

    def _drain_prompt_tokens(self) -> int:
        out, self._prompt_tokens_done = self._prompt_tokens_done, 0
        return out

    def _finish(self, req: Request, error: str | None = None) -> None:
        seq = req.seq
        shard = self.scheduler.seqs[seq.seq_id].shard if seq.seq_id in self.scheduler.seqs else None
        self.scheduler.finish(seq.seq_id)
        if shard is not None:
            self._release[shard].append(seq.seq_id)
        req.finished_at = time.perf_counter()
        if req.first_token_at is not None and len(seq.output_ids) > 1:
            self.tpot.append((req.finished_at - req.first_token_at) / (len(seq.output_ids) - 1))
        result = seq.result()
        if error:
            result.finish_reason, result.error = "error", error
        self._finished_reasons[result.finish_reason] += 1
        self._prompt_tokens_done += len(seq.prompt_ids)
        self._finished_order.append(seq.seq_id)
        while len(self._finished_order) > self.keep_finished:  # their streams were handed out long ago
            self.requests.pop(self._finished_order.pop(0), None)
        req.events.put(StreamEvent("", [], True, result))

    def _fail_all(self, error: str) -> None:
        for req in self.requests.values():
            if not req.seq.finished and req.finished_at is None:
                req.seq.finish_reason = "error"
                self._finish(req, error)

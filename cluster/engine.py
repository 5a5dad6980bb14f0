"""The engine: drives lockstep steps over the actors and turns sampled tokens into streamed text.

Each step reads as three lines: schedule, run, post-process. Runs in a background thread of the
process that owns the cluster handle; ``submit``/``cancel`` may be called from any thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import ray

from actors.messages import ChunkPlan, StepPlan
from cluster.rebalance import PlacementSwitch
from cluster.scheduler import Scheduler
from model.sampling import SamplingParams, with_seed
from model.sequence import GenerationResult, Sequence
from model.speculative import assign_micro_batches, speculative_for

log = logging.getLogger("raymoe.engine")


@dataclass
class StreamEvent:
    text: str  # new text, safe to show (never a broken character, never part of a stop string)
    token_ids: list[int]  # new token ids
    finished: bool = False
    result: GenerationResult | None = None
    # with logprobs asked for: per new token, its logprob and its top alternatives [[id, logprob], ...]
    logprobs: list[tuple[float, list]] | None = None


class ClusterUnavailable(RuntimeError):
    """The cluster cannot serve now (its data plane could not be rebuilt); raised by ``submit``."""


HEALTHY, RECOVERING, UNHEALTHY = "healthy", "recovering", "unhealthy"


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
    def __init__(self, attention_actors, expert_actors, router, scheduler: Scheduler, tokenizer, eos_token_ids,
                 max_len: int, step_timeout_s: float = 600.0, rebuild=None, max_step_failures: int = 3,
                 max_rebuild_attempts: int = 3, backoff_s: tuple[float, float] = (1.0, 60.0),
                 switch: PlacementSwitch | None = None, regroup=None, speculative_tokens: int = 0,
                 have_mtp: bool = False, decode_steps: int = 1, micro_batches: int = 1):
        """``rebuild()``: replace every data-plane actor after a failure (an actor died, a collective timed
        out) and return the new (attention, expert) actors; requests in flight are then re-run from
        their token history.

        Recovery goes on for as long as it works: a step that fails triggers a rebuild (then an empty
        probe step over every actor); a successful step resets the count. The same requests failing
        ``max_step_failures`` steps in a row are failed (they may be what breaks the step). After
        ``max_rebuild_attempts`` failed rebuilds in a row the cluster is unhealthy: requests in flight
        fail, new ones are refused with ``ClusterUnavailable``, and rebuilds go on with exponential
        backoff (``backoff_s`` = first, longest wait) until one succeeds."""
        self.attention, self.experts, self.router = attention_actors, expert_actors, router
        self.scheduler, self.tokenizer, self.eos_token_ids, self.max_len = scheduler, tokenizer, eos_token_ids, max_len
        self.step_timeout_s = step_timeout_s
        self.rebuild, self.max_step_failures = rebuild, max_step_failures
        self.max_rebuild_attempts = max_rebuild_attempts
        self.backoff_s = backoff_s
        self.switch, self._regroup = switch, regroup
        # MTP drafts per step for requests that do not say; the shards loaded the MTP layer when have_mtp
        self.speculative_tokens, self.have_mtp = speculative_tokens, have_mtp
        # model steps per actor call while every sequence decodes (the shards feed back their own tokens)
        self.decode_steps = decode_steps
        # micro-batches per shard (2: one's attention overlaps the other's experts) for steps of 2+ sequences
        self.micro_batches = micro_batches
        self._idle_ticks = 0  # seconds spent idle with an autoscale policy (they count as steps for it)
        self.health, self.health_error = HEALTHY, None
        self._step_failures = 0  # consecutive
        self.requests: dict[int, Request] = {}
        self._release: dict[int, list[int]] = defaultdict(list)  # shard -> seq ids to release
        self._cancel: list[int] = []
        self._next_id = 0
        self._cv = threading.Condition()
        self._stopping = False
        self.totals = defaultdict(float)  # tokens, steps, seconds per phase, ...
        self.recent: deque[tuple[float, int]] = deque(maxlen=200)  # (time, tokens generated) per step
        self.ttft: deque[float] = deque(maxlen=1000)  # the latest, for stats
        self.tpot: deque[float] = deque(maxlen=1000)
        self.step_seconds: deque[float] = deque(maxlen=4096)  # the latest steps' durations
        self._new_ttft: list[float] = []  # since the last report to the router
        self._new_tpot: list[float] = []
        self._finished_reasons: dict[str, int] = defaultdict(int)  # since the last report to the router
        self._finished_order: deque[int] = deque()
        self.keep_finished = 10_000  # finished requests kept for late readers of their stream
        self._prompt_tokens_done = 0
        self._thread = threading.Thread(target=self._loop, name="raymoe-engine", daemon=True)
        self._thread.start()

    # public, thread-safe
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        with self._cv:
            if self._stopping:
                raise ClusterUnavailable("the cluster is shutting down; it takes no new requests")
            if self.health == UNHEALTHY:
                raise ClusterUnavailable(
                    f"the cluster cannot serve now ({self.health_error}); it keeps trying to rebuild itself: "
                    "retry later, and check the Ray dashboard for lost nodes or resources"
                )
            seq_id = self._next_id
            seq = Sequence(seq_id, prompt_ids, with_seed(params), self.tokenizer, self.eos_token_ids, self.max_len)
            seq.speculative_tokens = speculative_for(seq.params, self.speculative_tokens, self.have_mtp)
            k = seq.speculative_tokens
            self.scheduler.add(seq_id, len(seq.prompt_ids), len(seq.prompt_ids) + seq.max_new,
                               lookahead=2 * k + (self.decode_steps - 1) * (1 + k), drafts=k)
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

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; every unfinished request ends at once (finish reason ``error``), even while a
        step or a rebuild is still running. ``timeout`` bounds the wait for the loop thread (0: none)."""
        with self._cv:
            self._stopping = True
            self._fail_all("the engine stopped")
            if self.switch is not None:
                self.switch.abort("the engine stopped", self.experts)
            self._cv.notify_all()
        if timeout:
            self._thread.join(timeout=timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout=timeout)

    def figures(self) -> dict:
        """A consistent snapshot for ``stats()``: health, shards, throughput, latencies, totals."""
        with self._cv:
            now = time.perf_counter()
            window = [t for t in self.recent if t[0] > now - 10]
            span = (window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
            sch = self.scheduler
            shards = [{"shard": i, "waiting": len(sh.waiting), "running": len(sh.running),
                       "blocks_used": sch.blocks_used(i), "blocks_total": sh.allocator.num_blocks}
                      for i, sh in enumerate(sch.shards)]
            ttft, tpot = list(self.ttft)[-100:], list(self.tpot)[-100:]
            return {
                "health": {"state": self.health, "error": self.health_error,
                           "recoveries": int(self.totals["recoveries"])},
                "shards": shards,
                "tokens_per_s": sum(n for _, n in window[1:]) / span if span else 0.0,
                "ttft_s": sum(ttft) / len(ttft) if ttft else None,
                "tpot_s": sum(tpot) / len(tpot) if tpot else None,
                "totals": dict(self.totals), "preemptions": sch.num_preemptions,
                "speculative": {"tokens": self.speculative_tokens, "draft_tokens": int(self.totals["draft_tokens"]),
                                "accepted_tokens": int(self.totals["accepted_tokens"]),
                                "acceptance_rate": (self.totals["accepted_tokens"] / self.totals["draft_tokens"]
                                                    if self.totals["draft_tokens"] else None)},
            }

    # the loop
    def _loop(self) -> None:
        while True:
            idle = False
            with self._cv:
                while not self._stopping and not self._cancel and not self.scheduler.has_work() \
                        and not self._switch_busy():
                    if self.switch is not None and self.switch.autoscale is not None:
                        # an idle cluster still gets autoscaling decisions (it scales in), once a second
                        if not self._cv.wait(timeout=1.0):
                            idle = True
                            break
                    else:
                        self._cv.wait()
                if self._stopping:
                    break
            try:
                if idle:
                    self._idle_ticks += 1
                    self.switch.idle_tick(int(self.totals["steps"]) + self._idle_ticks)
                    continue
                self._iteration()
            except Exception as e:  # noqa: BLE001 - a bug outside the step must end requests, never hang them
                log.exception("engine iteration failed")
                with self._cv:
                    self._fail_all(f"internal error in the engine: {e!r}")
        with self._cv:
            self._fail_all("the engine stopped")

    def _switch_busy(self) -> bool:
        return self.switch is not None and self.switch.busy

    def abort_placement(self, future, error: str) -> None:
        """Drop the change ``future`` belongs to, if it is still pending (its caller gave up)."""
        with self._cv:
            if self.switch is not None and self.switch.change is not None and self.switch.change.future is future:
                self.switch.abort(error, self.experts)

    def request_placement(self, placement, experts: list | None = None, ready_refs: list | None = None,
                          new_actors: list | None = None):
        """Apply ``placement`` at a coming step boundary (``experts``: the new expert actor list when
        scaling); returns a ``Future`` of the version, set once every actor has switched."""
        with self._cv:
            if self.health != HEALTHY:
                raise ClusterUnavailable(f"the cluster is {self.health}; try again when it is healthy")
            if experts is not None and any(e not in self.experts and e not in (new_actors or []) for e in experts):
                raise RuntimeError("the expert actors changed while this change was prepared (a recovery); "
                                   "try again")
            future = self.switch.request(placement, experts, ready_refs)
            self._cv.notify()
            return future

    def _iteration(self) -> None:
        """One step: schedule, run, post-process."""
        placement, switch_to = None, None
        if self.switch is not None:
            try:
                self.switch.tick(int(self.totals["steps"]) + self._idle_ticks, self)
            except Exception as e:  # noqa: BLE001 - a failed policy decision is skipped, serving goes on
                log.warning("placement policy failed: %s", e)
            try:
                placement, switch_to = self.switch.before_step(self)
            except Exception as e:  # noqa: BLE001 - a failed regroup is a failed step
                self._step_failed(e)
                return
        with self._cv:
            self._apply_cancels()
            chunks = self.scheduler.schedule()
            if not any(chunks) and switch_to is None and not self._switch_busy():
                plans = None
            else:
                plans = self._plans(chunks)
        if plans is None:
            time.sleep(0.01)
            return
        if not any(p.chunks for p in plans) and switch_to is None:
            time.sleep(0.005)  # waiting for a placement to be staged: poll with empty steps
        steps = self._decode_steps(chunks, switch_to)
        micro = self.micro_batches if any(len(p.chunks) > 1 for p in plans) else 1
        capacity = self._capacity_tokens(plans, micro)
        for p in plans:
            p.placement, p.decode_steps, p.capacity_tokens, p.micro_batches = placement, steps, capacity, micro
        t0 = time.perf_counter()
        try:
            outputs, expert_outputs = self._run(plans, switch_to)
        except Exception as e:  # noqa: BLE001 - recover (or fail the requests), the engine goes on
            self._step_failed(e)
            return
        self._step_failures = 0
        seconds = time.perf_counter() - t0
        self.step_seconds.append(seconds)
        if self.switch is not None:
            self.switch.after_step(self.experts, expert_outputs, switch_to, seconds)
        with self._cv:
            self._post_process(chunks, outputs, expert_outputs)

    def _decode_steps(self, chunks, switch_to) -> int:
        """Several model steps in one call only while every scheduled sequence decodes and nothing else
        waits (a prefill, a cancel, a placement change): they would wait for the whole call."""
        if self.decode_steps == 1 or switch_to is not None or self._switch_busy() or self._cancel:
            return 1
        if any(sh.waiting for sh in self.scheduler.shards) or not all(c.sample for cs in chunks for c in cs):
            return 1
        return self.decode_steps

    @staticmethod
    def _capacity_tokens(plans: list[StepPlan], micro_batches: int = 1) -> int:
        """A bound on any shard's micro-batch's tokens in any model step of the call: its chunks in the
        first, and at most one token plus the drafts per sampling sequence in the ones it feeds itself."""
        bound = 0
        for p in plans:
            parts = assign_micro_batches([len(c.tokens) for c in p.chunks], micro_batches)
            for m in range(micro_batches):
                chunks = [c for c, part in zip(p.chunks, parts, strict=True) if part == m]
                bound = max(bound, sum(len(c.tokens) for c in chunks), sum(1 + c.propose for c in chunks if c.sample))
        return bound

    def regroup(self, experts: list, placement) -> None:
        """Join the attention shards and ``experts`` in a new process group on ``placement`` (at a step
        boundary: scaling the expert actors); actors no longer in the list are stopped."""
        self._regroup(self.attention, experts, placement)
        removed = [e for e in self.experts if e not in experts]
        self.experts = list(experts)
        for e in removed:
            ray.kill(e, no_restart=True)

    def _step_failed(self, e: Exception) -> None:
        """Recover (or fail the requests that keep breaking steps); the engine goes on."""
        log.warning("step failed: %s", e)
        self._step_failures += 1
        if self._step_failures >= self.max_step_failures:
            with self._cv:  # the same requests broke every step since the last good one
                self._fail_all(f"step failed {self._step_failures} times in a row: {e}")
            self._step_failures = 0
        if self.switch is not None:
            self.switch.abort(str(e), self.experts)
        self._recover(e)

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
                seq, k = req.seq, req.seq.speculative_tokens
                room = len(c.block_table) * self.scheduler.block_size - c.end
                drafts = seq.drafts_to_verify()[:room] if c.sample and k else []
                plan.chunks.append(ChunkPlan(c.seq_id, seq.all_ids[c.start:c.end] + drafts, c.start,
                                             list(c.block_table), c.sample, params, len(drafts), k,
                                             seq.all_ids[c.end] if k and not c.sample else None,
                                             seq.remaining, tuple(seq.stop_ids)))
            plans.append(plan)
        return plans

    def _recover(self, error: Exception) -> bool:
        """Rebuild the data plane and re-queue every running request for recomputation. No accepted
        request is lost or duplicated: the failed step's samples were never recorded. Retries with
        backoff until a rebuild (and a probe step over every actor) succeeds or the engine stops."""
        with self._cv:
            self.scheduler.requeue_all()
            self._release.clear()
            for req in self.requests.values():
                req.sent_params = False
            if self.rebuild is None:
                self._set_health(UNHEALTHY, f"step failed and this engine cannot rebuild: {error}")
                self._fail_all(f"step failed: {error}")
                return False
            if self.health == HEALTHY:
                self._set_health(RECOVERING, str(error))
        attempt = 0
        while not self._stopping:
            try:
                self.attention, self.experts = self.rebuild()
                self._run([StepPlan() for _ in self.attention])  # every actor, every collective, no tokens
            except Exception as e:  # noqa: BLE001 - count it, back off, try again
                attempt += 1
                log.warning("rebuilding the cluster failed (attempt %d): %s", attempt, e)
                with self._cv:
                    if attempt >= self.max_rebuild_attempts and self.health != UNHEALTHY:
                        self._set_health(UNHEALTHY, f"rebuilding the cluster failed {attempt} times: {e}")
                        self._fail_all(f"the cluster cannot serve: {e}")
                    self._cv.wait(min(self.backoff_s[1], self.backoff_s[0] * 2 ** (attempt - 1)))
                continue
            with self._cv:
                self.totals["recoveries"] += 1
                self._set_health(HEALTHY, None)
            log.warning("cluster rebuilt after: %s; requests in flight are recomputed", error)
            return True
        return False

    def _set_health(self, state: str, error: str | None) -> None:
        self.health, self.health_error = state, error
        try:
            self.router.set_health.remote(state, error)
        except Exception:  # noqa: BLE001 - the router may be gone too; stats() still tells
            pass

    def _run(self, plans: list[StepPlan], switch_to: int | None = None):
        """One lockstep step over every actor -> (attention outputs, expert outputs)."""
        t0 = time.perf_counter()
        attn_refs = [a.step.remote(p) for a, p in zip(self.attention, plans, strict=True)]
        steps, capacity, micro = ((plans[0].decode_steps, plans[0].capacity_tokens, plans[0].micro_batches)
                                  if plans else (1, 0, 1))
        expert_refs = [e.step.remote(switch_to, steps, capacity, micro) for e in self.experts]
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
        return outputs, expert_outputs

    def _post_process(self, chunks, outputs, expert_outputs=()) -> None:
        t0 = time.perf_counter()
        self.scheduler.computed(chunks)
        now = time.perf_counter()
        load: dict[int, list[int]] = {}
        picked = []
        for out in outputs:
            for layer, counts in out.load.items():
                load[layer] = [a + b for a, b in zip(load.get(layer, [0] * len(counts)), counts, strict=True)]
            for seq_id, emitted in out.sampled.items():
                req = self.requests.get(seq_id)
                if req is not None and not req.seq.finished:
                    picked.append((req, emitted, *out.drafts.get(seq_id, (0, 0, []))))
        steps, step_drafts, step_accepted = [], 0, 0
        for req, emitted, verified, accepted, drafts in picked:
            steps.append((req, req.seq.record_step(emitted, verified, accepted, drafts)))
            step_drafts += verified
            step_accepted += accepted
        self.totals["draft_tokens"] += step_drafts
        self.totals["accepted_tokens"] += step_accepted
        generated = sum(len(appended) for _, appended in steps)
        # figures first, so that a reader woken by the events below sees them
        model_steps = outputs[0].steps if outputs else 1
        self.totals["steps"] += 1
        self.totals["model_steps"] += model_steps
        self.totals["tokens_generated"] += generated
        self.totals["tokens_computed"] += sum(o.num_tokens for o in outputs)
        self.recent.append((now, generated))
        for req, appended in steps:
            if appended and req.first_token_at is None:
                req.first_token_at = now
                self.ttft.append(now - req.submitted)
                self._new_ttft.append(now - req.submitted)
            seq = req.seq
            at = len(seq.output_ids) - len(appended)  # the first appended token's position
            for j, (token, piece) in enumerate(appended):
                self.scheduler.appended(seq.seq_id)
                lp = [(seq.token_logprobs[at + j], seq.top_logprobs[at + j])] if seq.params.logprobs else None
                req.events.put(StreamEvent(piece, [token], logprobs=lp))
            self.scheduler.settle(req.seq.seq_id)
            if req.seq.finished:
                self._finish(req)
        phases = defaultdict(float)
        for out in outputs:
            for phase, s in out.seconds.items():
                phases[phase] += s
        self.router.record_step.remote({
            "load": load, "tokens_generated": generated, "draft_tokens": step_drafts,
            "accepted_tokens": step_accepted, "ttft": self._drain(self._new_ttft),
            "tpot": self._drain(self._new_tpot),
            "finished": self._drain_finished(), "prompt_tokens": self._drain_prompt_tokens(),
            "shards": [{"shard": i, "waiting": len(sh.waiting), "running": len(sh.running),
                        "blocks_used": self.scheduler.blocks_used(i)} for i, sh in enumerate(self.scheduler.shards)],
            "phases": dict(phases),
            # per model step (a call may run several): the autoscaling signal is rows per actor per step
            "expert_rows": [sum(o.rows) / model_steps for o in expert_outputs],
            "expert_rows_total": [o.rows_total for o in expert_outputs],
        })
        self.totals["scheduler_seconds"] += time.perf_counter() - t0

    @staticmethod
    def _drain(values: list) -> list:
        out = list(values)
        values.clear()
        return out

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
            tpot = (req.finished_at - req.first_token_at) / (len(seq.output_ids) - 1)
            self.tpot.append(tpot)
            self._new_tpot.append(tpot)
        result = seq.result()
        if error:
            result.finish_reason, result.error = "error", error
        self._finished_reasons[result.finish_reason] += 1
        self._prompt_tokens_done += len(seq.prompt_ids)
        self._finished_order.append(seq.seq_id)
        while len(self._finished_order) > self.keep_finished:  # their streams were handed out long ago
            self.requests.pop(self._finished_order.popleft(), None)
        req.events.put(StreamEvent("", [], True, result))

    def _fail_all(self, error: str) -> None:
        for req in list(self.requests.values()):  # _finish forgets the oldest finished requests
            if not req.seq.finished and req.finished_at is None:
                req.seq.finish_reason = "error"
                self._finish(req, error)

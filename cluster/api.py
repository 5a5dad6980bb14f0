"""The public Python API of a raymoe cluster: start or connect, submit, stream, cancel, stats,
shutdown. The command line, the web page and batch jobs use only this module.

    llm = RayMoE.start("path/to/checkpoint", attention_shards=2, expert_actors=2)
    rid = llm.submit("Hello", SamplingParams(temperature=0, max_new_tokens=32))
    for event in llm.stream(rid):
        print(event.text, end="")
    llm.shutdown()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import ray

from actors.placement import Placement
from cluster.bringup import DataPlane
from cluster.engine import ClusterUnavailable, Engine, StreamEvent
from cluster.layout import ClusterLayout
from cluster.rebalance import PlacementSwitch
from cluster.scheduler import Scheduler
from model.checkpoint import validate_checkpoint
from model.config import ModelArgs, end_of_sequence_ids, generation_defaults
from model.sampling import SamplingParams
from model.sequence import GenerationResult
from model.speculative import require_mtp
from model.tokenizer import Tokenizer, encode_prompt

log = logging.getLogger("raymoe")

__all__ = ["ClusterUnavailable", "RayMoE", "SamplingParams", "StreamEvent", "GenerationResult", "ClusterLayout"]


def _ensure_ray(address: str | None, loopback: bool = True) -> tuple[bool, str | None]:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, as inside a Ray job) or start embedded Ray with its
    dashboard on 127.0.0.1; with ``loopback`` every port embedded Ray opens listens on 127.0.0.1 only
    (its node address is the loopback one). Returns (whether this call started Ray, the dashboard URL)."""
    if ray.is_initialized():
        return False, None
    if address or os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(address=address or "auto", log_to_driver=False)
        started = False
    else:
        if loopback:
            # Ray takes the loopback address as the node's own only on a single-machine build; this
            # switch (read by Ray's processes at start, and by this one through its constant) selects it
            from ray._private import ray_constants

            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray_constants.ENABLE_RAY_CLUSTER = False
        # "local": a new instance of our own, never a `ray start` cluster already running on this machine
        ctx = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
        started = True
    url = getattr(ctx, "dashboard_url", None)
    return started, (f"http://{url}" if url and not url.startswith("http") else url)


class RayMoE:
    """A handle on a running raymoe cluster (attention shards, expert actors, a router, the engine)."""

    def __init__(self, model_dir: Path, layout: ClusterLayout, args: ModelArgs, tokenizer: Tokenizer | None,
                 attention, experts, router, plane: DataPlane, engine: Engine, started_ray: bool):
        self.model_dir, self.layout, self.args, self.tokenizer = model_dir, layout, args, tokenizer
        self.attention, self.experts, self.router, self._plane = attention, experts, router, plane
        self.engine, self._started_ray = engine, started_ray
        self._scale_lock = threading.Lock()
        self.started_at = time.time()
        self.dashboard_url: str | None = None
        self.generation_defaults: dict = {}  # generation_config.json's sampling defaults (``start`` sets them)
        self._replace_actors(attention, experts)

    def _replace_actors(self, attention, experts) -> None:
        self.attention, self.experts = attention, experts
        nodes = ray.get([a.node_id.remote() for a in attention + experts], timeout=60)
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        actors = [{"role": "attention", "index": i, "actor": a} for i, a in enumerate(attention)]
        actors += [{"role": "expert", "index": i, "actor": a} for i, a in enumerate(experts)]
        for entry, node in zip(actors, nodes, strict=True):
            entry.update(node_id=node, node_ip=ips.get(node, "?"), device=self.layout.device)
        self._actors = actors
        if getattr(self, "router", None) is not None:
            self.router.set_actor_nodes.remote(nodes[len(attention):])

    @classmethod
    def start(cls, model: str | Path | None = None, layout: ClusterLayout | str | Path | None = None,
              address: str | None = None, loopback: bool = True, need_tokenizer: bool = False,
              **layout_overrides) -> RayMoE:
        """Bring up a cluster on the checkpoint ``model`` (default: the default model, model/weights/shakespeare), in
        embedded Ray (on 127.0.0.1 only unless ``loopback`` is false) or the cluster at ``address``.
        The checkpoint is checked here, before any actor starts (config, file headers, every tensor
        the model needs, and the tokenizer when ``need_tokenizer``): a bad one is one clear error."""
        from actors.router import RouterActor

        if model is None:
            from model.tiny import default_checkpoint

            model = default_checkpoint()
        model_dir = Path(model).resolve()
        args = validate_checkpoint(model_dir, need_tokenizer=need_tokenizer)
        if not isinstance(layout, ClusterLayout):
            layout = ClusterLayout.load(layout, **layout_overrides)
        require_mtp(model_dir, args.num_nextn_predict_layers, layout.speculative_tokens)
        tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").exists() else None
        started, dashboard = _ensure_ray(address, loopback)

        placement = Placement.initial(args.moe_layers, args.n_routed_experts, layout.expert_actors,
                                      layout.spare_slots, layout.replicas)
        plane = DataPlane(model_dir, layout)
        try:
            attention, experts = plane.spawn(placement)
        except Exception:
            plane.shutdown()
            raise
        balance, autoscale = layout.balance_policy, layout.autoscale_policy
        window = max([64] + [p.window_steps for p in (balance, autoscale) if p is not None])
        router = RouterActor.options(**({"resources": layout.resources["router"]}
                                        if "router" in layout.resources else {})).remote(
            placement, args.n_routed_experts, window, args.n_group)
        handle: dict = {}

        def rebuild():  # a fault: every data-plane actor anew, on the placement in force
            llm = handle["llm"]
            for a in llm.attention + llm.experts:
                ray.kill(a, no_restart=True)
            new_attention, new_experts = plane.spawn(llm.engine.switch.placement)
            llm._replace_actors(new_attention, new_experts)
            return new_attention, new_experts

        def regroup(attention, experts, placement):  # scaling: a new process group at a step boundary
            plane.join(attention, experts, placement, timeout=max(60.0, layout.collective_timeout_s))
            handle["llm"]._replace_actors(attention, experts)

        switch = PlacementSwitch(placement, router, balance, autoscale,
                                 scale=lambda n: handle["llm"]._scale_in_background(n))
        scheduler = Scheduler(layout.attention_shards, layout.num_blocks, layout.block_size,
                              layout.max_batch_tokens, layout.max_running)
        defaults = generation_defaults(model_dir)  # read once: the API's sampling defaults and the eos ids
        eos = end_of_sequence_ids(tokenizer, args, defaults)
        engine = Engine(attention, experts, router, scheduler, tokenizer, eos, args.max_position_embeddings,
                        step_timeout_s=max(60.0, 2 * layout.collective_timeout_s), rebuild=rebuild,
                        switch=switch, regroup=regroup, speculative_tokens=layout.speculative_tokens,
                        have_mtp=layout.speculative_tokens > 0, decode_steps=layout.decode_steps,
                        micro_batches=layout.micro_batches)
        llm = cls(model_dir, layout, args, tokenizer, attention, experts, router, plane, engine, started)
        llm.dashboard_url = dashboard
        llm.generation_defaults = defaults
        handle["llm"] = llm
        return llm

    # requests
    def encode(self, prompt: str | list[int] | list[dict]) -> list[int]:
        """Token ids for a text prompt, a list of ids, or a list of chat messages."""
        return encode_prompt(self.tokenizer, prompt, self.args.vocab_size)

    def submit(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None) -> int:
        """Queue a request (text, token ids, or chat messages); returns its id. Bad input raises
        ``ValueError`` and leaves the cluster serving the others."""
        return self.engine.submit(self.encode(prompt), params or SamplingParams())

    def stream(self, request_id: int):
        """Yields ``StreamEvent``s until the request finishes (the last one carries the result)."""
        return self.engine.events(request_id)

    def result(self, request_id: int) -> GenerationResult:
        for ev in self.stream(request_id):
            if ev.finished:
                return ev.result
        raise RuntimeError("stream ended without a result")

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerationResult]:
        prompts = list(prompts)
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        return [self.result(i) for i in ids]

    def cancel(self, request_id: int) -> None:
        self.engine.cancel(request_id)

    # placement
    @property
    def placement(self) -> Placement:
        """The expert placement in force (logical -> physical slots, with its version)."""
        return self.engine.switch.placement

    def rebalance(self, timeout: float | None = 600.0) -> int:
        """Plan a placement for the recent load now and apply it live (the weights load in the
        background; every actor switches at one step boundary). Returns the placement version in
        force afterwards (unchanged when the current placement is already the best found)."""
        with self._scale_lock:  # one change at a time: a scaling under way finishes first
            self._wait_for_no_change(timeout)  # and so does an automatic rebalance
            result = ray.get(self.router.plan.remote(force=True), timeout=60)
            if result.placement is None:
                return self.placement.version
            return self.engine.request_placement(result.placement).result(timeout)

    def scale_experts(self, n: int, timeout: float | None = 1800.0) -> int:
        """Run with ``n`` expert actors from a coming step boundary, while requests go on: new actors
        start in new placement-group bundles and load their slots, the planner re-places the experts
        over ``n`` actors, staying actors stage their new slots in the background, then the process
        group is rebuilt over the new set at one step boundary. Returns the new placement version."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"scale_experts needs a number of expert actors >= 1, got {n!r}")
        with self._scale_lock:
            self.engine.switch.scaling = True
            try:
                return self._scale(n, timeout)
            finally:
                self.engine.switch.scaling = False

    def _wait_for_no_change(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.engine.switch.busy:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("a placement change under way did not finish in time")
            time.sleep(0.05)

    def _scale(self, n: int, timeout: float | None) -> int:
        self._wait_for_no_change(timeout)
        current = self.placement
        if n == current.num_actors:
            return current.version
        slots = -(-self.args.n_routed_experts // n) + self.layout.spare_slots
        result = ray.get(self.router.plan.remote(force=True, num_actors=n, slots_per_actor=slots), timeout=60)
        placement = result.placement
        staying = self.engine.experts[:min(n, current.num_actors)]
        new, future = [], None
        try:
            for i in range(current.num_actors, n):  # one at a time: a failure keeps what to clean up
                new += self._plane.spawn_experts([i], placement)
            ready = [a.address.remote() for a in new]
            future = self.engine.request_placement(placement, staying + new, ready, new_actors=new)
            version = future.result(timeout)
        except Exception as e:
            if future is not None:
                self.engine.abort_placement(future, f"scaling to {n} expert actors failed: {e}")
            for a in new:
                ray.kill(a, no_restart=True)
            self._plane.release_experts_from(current.num_actors)
            raise
        self._plane.release_experts_from(n)
        return version

    def _scale_in_background(self, n: int) -> None:
        def run():
            try:
                self.scale_experts(n)
            except Exception as e:  # noqa: BLE001 - the policy tries again later
                log.warning("autoscaling to %d expert actors failed: %s", n, e)

        threading.Thread(target=run, name="raymoe-autoscale", daemon=True).start()

    # watching
    def stats(self) -> dict:
        """Figures for the dashboard: health, shards, throughput, latencies, expert load. Never blocks
        for long: the router's figures are the last ones known when it does not answer in 5 s."""
        figures = self.engine.figures()
        try:
            self._expert_load = ray.get(self.router.load_stats.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - a slow or lost router must not stall the page
            log.warning("the router did not answer: %s", e)
        load = getattr(self, "_expert_load", {})
        return {
            "layout": {"attention_shards": self.layout.attention_shards, "expert_actors": len(self.experts),
                       "transport": self._plane.transport},
            **figures,
            "expert_load": load,
            "placement_version": self.placement.version,
            "experts": load.get("experts", []),
        }

    def health(self) -> dict:
        """``{"state": "healthy" | "recovering" | "unhealthy", "error": str | None}`` (no actor call)."""
        return {"state": self.engine.health, "error": self.engine.health_error}

    def describe(self) -> dict:
        """What this cluster serves, for pages and APIs: the model's name, type and size figures, and
        the layout in force."""
        return {"model": self.model_dir.name, "model_dir": str(self.model_dir), "model_type": self.args.model_type,
                "n_routed_experts": self.args.n_routed_experts, "vocab_size": self.args.vocab_size,
                "max_context": self.args.max_position_embeddings,
                # the longest sequence (prompt + output) one attention shard's cache can hold
                "max_sequence_tokens": min(self.args.max_position_embeddings,
                                           self.layout.num_blocks * self.layout.block_size),
                "attention_shards": self.layout.attention_shards, "expert_actors": len(self.experts),
                "transport": self._plane.transport, "has_tokenizer": self.tokenizer is not None,
                "started_at": self.started_at, "generation_defaults": self.generation_defaults}

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's text on its own (a token that holds part of a character shows U+FFFD)."""
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's own bytes (``Tokenizer.token_bytes``): the bytes of a part of a character too."""
        if self.tokenizer is None:
            return [t.encode() for t in self.token_texts(ids)]
        return self.tokenizer.token_bytes(ids)

    def cluster_info(self) -> list[dict]:
        """Each actor: role, index, node, device and state (from Ray's state API when it is up)."""
        states = {}
        try:
            from ray.util.state import list_actors

            states = {a.actor_id: a.state for a in list_actors(limit=1000, timeout=5, raise_on_missing_output=False)}
        except Exception:  # noqa: BLE001 - no dashboard (state API) here: state unknown, the rest still shown
            pass
        out = []
        for entry in self._actors:
            info = {k: v for k, v in entry.items() if k != "actor"}
            info["state"] = states.get(entry["actor"]._actor_id.hex(), "unknown")
            out.append(info)
        return out

    def shutdown(self) -> None:
        self.engine.stop(timeout=0)  # every open stream ends now, even mid-step
        if not ray.is_initialized():  # Ray already gone: its actors went with it
            return
        for a in self.attention + self.experts + [self.router]:
            ray.kill(a)  # a step in flight fails at once
        self.engine.join(timeout=30)
        self._plane.shutdown()
        if self._started_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

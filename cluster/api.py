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
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.collective import GroupInfo
from actors.placement import Placement
from cluster.engine import Engine, StreamEvent
from cluster.layout import ClusterLayout
from cluster.scheduler import Scheduler
from model.checkpoint import validate_checkpoint
from model.config import ModelArgs
from model.sampling import SamplingParams
from model.sequence import GenerationResult
from model.tokenizer import Tokenizer, encode_prompt

log = logging.getLogger("raymoe")

__all__ = ["RayMoE", "SamplingParams", "StreamEvent", "GenerationResult", "ClusterLayout"]


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
        ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
        started = True
    url = getattr(ctx, "dashboard_url", None)
    return started, (f"http://{url}" if url and not url.startswith("http") else url)


def _spawn_data_plane(model_dir: Path, layout: ClusterLayout, placement: Placement, pg):
    """Attention and expert actors in their placement-group bundles, joined in one process group."""
    from actors.attention import AttentionActor
    from actors.expert import ExpertActor

    def on(i):
        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

    common = dict(num_cpus=layout.num_cpus_per_actor, num_gpus=1 if layout.device == "cuda" else 0)
    attention = [
        AttentionActor.options(scheduling_strategy=on(i), **common).remote(
            str(model_dir), layout.dtype, layout.num_blocks, layout.block_size, layout.torch_threads, layout.device)
        for i in range(layout.attention_shards)
    ]
    experts = [
        ExpertActor.options(scheduling_strategy=on(layout.attention_shards + i), **common).remote(
            str(model_dir), i, placement, layout.dtype, layout.torch_threads, layout.device)
        for i in range(layout.expert_actors)
    ]
    actors = attention + experts
    try:  # loading weights happens in the actors' constructors: bounded by the layout's startup timeout
        master_addr, master_port = ray.get(actors[0].address.remote(), timeout=layout.startup_timeout_s)
        infos = [GroupInfo(rank, layout.world_size, layout.attention_shards, layout.backend,
                           layout.collective_timeout_s) for rank in range(layout.world_size)]
        ray.get([a.init_group.remote(info, master_addr, master_port, placement)
                 for a, info in zip(actors, infos, strict=True)], timeout=layout.startup_timeout_s)
    except Exception:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise
    return attention, experts


class RayMoE:
    """A handle on a running raymoe cluster (attention shards, expert actors, a router, the engine)."""

    def __init__(self, model_dir: Path, layout: ClusterLayout, args: ModelArgs, tokenizer: Tokenizer | None,
                 attention, experts, router, pg, engine: Engine, started_ray: bool):
        self.model_dir, self.layout, self.args, self.tokenizer = model_dir, layout, args, tokenizer
        self.attention, self.experts, self.router, self._pg = attention, experts, router, pg
        self.engine, self._started_ray = engine, started_ray
        self.started_at = time.time()
        self.dashboard_url: str | None = None
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

    @classmethod
    def start(cls, model: str | Path | None = None, layout: ClusterLayout | str | Path | None = None,
              address: str | None = None, loopback: bool = True, need_tokenizer: bool = False,
              **layout_overrides) -> RayMoE:
        """Bring up a cluster on the checkpoint ``model`` (default: the tiny demo checkpoint), in
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
        tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").exists() else None
        started, dashboard = _ensure_ray(address, loopback)

        placement = Placement.initial(args.moe_layers, args.n_routed_experts, layout.expert_actors,
                                      layout.spare_slots, layout.replicas)
        gpus = 1 if layout.device == "cuda" else 0
        bundles = ([{"CPU": layout.num_cpus_per_actor, "GPU": gpus, **layout.resources.get("attention", {})}]
                   * layout.attention_shards
                   + [{"CPU": layout.num_cpus_per_actor, "GPU": gpus, **layout.resources.get("expert", {})}]
                   * layout.expert_actors)
        bundles = [{k: v for k, v in b.items() if v} for b in bundles]
        pg = placement_group(bundles, strategy=layout.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=120)
        except Exception as e:
            remove_placement_group(pg)
            raise RuntimeError(
                f"the cluster cannot place {len(bundles)} actors with {bundles} ({layout.placement_strategy}); "
                f"available: {ray.available_resources()}. Lower num_cpus_per_actor or the actor counts"
            ) from e

        def spawn():
            return _spawn_data_plane(model_dir, layout, placement, pg)

        attention, experts = spawn()
        router = RouterActor.options(**({"resources": layout.resources["router"]}
                                        if "router" in layout.resources else {})).remote(
            placement, args.n_routed_experts)
        handle: dict = {}

        def rebuild():
            for a in handle["llm"].attention + handle["llm"].experts:
                ray.kill(a, no_restart=True)
            new_attention, new_experts = spawn()
            handle["llm"]._replace_actors(new_attention, new_experts)
            return new_attention, new_experts

        scheduler = Scheduler(layout.attention_shards, layout.num_blocks, layout.block_size,
                              layout.max_batch_tokens, layout.max_running)
        eos = tokenizer.eos_token_id if tokenizer and tokenizer.eos_token_id is not None else args.eos_token_id
        engine = Engine(attention, experts, router, scheduler, tokenizer, eos, args.max_position_embeddings,
                        step_timeout_s=max(60.0, 2 * layout.collective_timeout_s), rebuild=rebuild)
        llm = cls(model_dir, layout, args, tokenizer, attention, experts, router, pg, engine, started)
        llm.dashboard_url = dashboard
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

    # watching
    def stats(self) -> dict:
        """Figures for the dashboard: health, shards, throughput, latencies, expert load. Never blocks
        for long: the router's figures are the last ones known when it does not answer in 5 s."""
        figures = self.engine.figures()
        try:
            self._expert_load = ray.get(self.router.load_stats.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - a slow or lost router must not stall the page
            log.warning("the router did not answer: %s", e)
        return {
            "layout": {"attention_shards": self.layout.attention_shards, "expert_actors": self.layout.expert_actors},
            **figures,
            "expert_load": getattr(self, "_expert_load", {}),
        }

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
        remove_placement_group(self._pg)
        if self._started_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

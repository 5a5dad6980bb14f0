"""The cluster's metrics as ``ray.util.metrics`` counters, gauges and histograms, so they appear on
Ray's dashboard and its Prometheus endpoint (prefixed ``ray_raymoe_``)."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class ClusterMetrics:
    def __init__(self):
        self.requests = Counter("raymoe_requests", "Requests finished, by finish reason", tag_keys=("reason",))
        self.tokens_in = Counter("raymoe_prompt_tokens", "Prompt tokens of finished requests")
        self.tokens_out = Counter("raymoe_generated_tokens", "Tokens generated")
        self.ttft = Histogram("raymoe_time_to_first_token_seconds", "Time to first token", LATENCY_BOUNDS)
        self.tpot = Histogram("raymoe_time_per_output_token_seconds", "Time per output token", LATENCY_BOUNDS)
        self.queue = Gauge("raymoe_queue_depth", "Sequences waiting for prefill", tag_keys=("shard",))
        self.running = Gauge("raymoe_running_sequences", "Sequences decoding", tag_keys=("shard",))
        self.blocks = Gauge("raymoe_cache_blocks_used", "MLA cache blocks in use", tag_keys=("shard",))
        self.load = Counter("raymoe_expert_tokens", "Tokens routed per (layer, logical expert)",
                            tag_keys=("layer", "expert"))
        self.state = Gauge("raymoe_cluster_state", "1 for the cluster's current state (healthy, recovering, "
                           "unhealthy), 0 for the others", tag_keys=("state",))
        self.health("healthy")
        self.imbalance = Gauge("raymoe_expert_imbalance", "max/mean rows per expert actor over the load window")
        self.rebalances = Counter("raymoe_rebalances", "Placement switches (rebalances and scaling)")
        self.rebalance_seconds = Counter("raymoe_rebalance_seconds", "Seconds from plan to switch, summed")
        self.placement_version = Gauge("raymoe_placement_version", "The placement version the cluster routes with")
        self.draft_tokens = Counter("raymoe_spec_draft_tokens", "MTP draft tokens verified")
        self.accepted_tokens = Counter("raymoe_spec_accepted_tokens",
                                       "MTP draft tokens kept (acceptance rate: accepted / draft)")
        self.phase = Histogram("raymoe_step_phase_seconds", "Seconds per step phase (dispatch, combine, ...)",
                               LATENCY_BOUNDS, tag_keys=("phase",))

    def step(self, s: dict) -> None:
        if s.get("tokens_generated"):
            self.tokens_out.inc(s["tokens_generated"])
        for v in s.get("ttft", []):
            self.ttft.observe(v)
        for v in s.get("tpot", []):
            self.tpot.observe(v)
        for reason, n in s.get("finished", {}).items():
            self.requests.inc(n, tags={"reason": reason})
        if s.get("draft_tokens"):
            self.draft_tokens.inc(s["draft_tokens"])
        if s.get("accepted_tokens"):
            self.accepted_tokens.inc(s["accepted_tokens"])
        if s.get("prompt_tokens"):
            self.tokens_in.inc(s["prompt_tokens"])
        for sh in s.get("shards", []):
            tags = {"shard": str(sh["shard"])}
            self.queue.set(sh["waiting"], tags=tags)
            self.running.set(sh["running"], tags=tags)
            self.blocks.set(sh["blocks_used"], tags=tags)
        for phase, seconds in s.get("phases", {}).items():
            self.phase.observe(seconds, tags={"phase": phase})

    def health(self, state: str) -> None:
        for name in ("healthy", "recovering", "unhealthy"):
            self.state.set(1 if name == state else 0, tags={"state": name})

    def expert_load(self, load: dict[int, list[int]]) -> None:
        for layer, counts in load.items():
            for e, n in enumerate(counts):
                if n:
                    self.load.inc(n, tags={"layer": str(layer), "expert": str(e)})

"""What the Cluster tab shows, computed from the cluster API's figures (no Gradio imports here)."""

from __future__ import annotations

import html


def actor_rows(info: list[dict]) -> list[list]:
    return [[a["role"], a["index"], a["node_ip"], a["node_id"][:12], a["device"], a["state"]] for a in info]


def shard_rows(stats: dict) -> list[list]:
    return [[s["shard"], s["waiting"], s["running"], f"{s['blocks_used']} / {s['blocks_total']}"]
            for s in stats["shards"]]


def summary_markdown(stats: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{1e3 * v:.1f} ms"

    t = stats["totals"]
    health = stats.get("health") or {"state": "healthy"}
    state = {"healthy": "healthy", "recovering": "recovering (rebuilding the data plane)",
             "unhealthy": "UNHEALTHY: new requests are refused"}.get(health["state"], health["state"])
    detail = f" ({html.escape(str(health['error']))})" if health.get("error") else ""
    return (f"**Cluster** {state}{detail}, recoveries {health.get('recoveries', 0)}<br>"
            f"**Throughput** {stats['tokens_per_s']:.1f} tokens/s (last 10 s) &nbsp; "
            f"**Time to first token** {ms(stats['ttft_s'])} &nbsp; **Time per output token** {ms(stats['tpot_s'])}"
            f"<br>steps {int(t.get('steps', 0))}, tokens generated {int(t.get('tokens_generated', 0))}, "
            f"preemptions {stats['preemptions']}{_speculative(stats.get('speculative'))}")


def _speculative(spec: dict | None) -> str:
    if not spec or not spec.get("draft_tokens"):
        return ""
    return (f"<br>**MTP drafts** {spec['draft_tokens']} verified, {spec['accepted_tokens']} kept "
            f"(acceptance {spec['acceptance_rate']:.2f})")


def load_heatmap_html(expert_load: dict, which: str = "window") -> str:
    """Layers x experts as an HTML table shaded by token count; a badge marks replicated experts."""
    load = expert_load.get(which) or {}
    replicas = expert_load.get("replicas") or {}
    if not load:
        return "<p>No MoE traffic yet.</p>"
    layers = sorted(load, key=int)
    peak = max((max(v) for v in load.values() if v), default=0) or 1
    n = len(load[layers[0]])
    head = "".join(f"<th>{e}</th>" for e in range(n))
    rows = []
    for layer in layers:
        cells = []
        reps = replicas.get(layer) or replicas.get(str(layer)) or [1] * n
        for e, count in enumerate(load[layer]):
            shade = int(255 - 200 * count / peak)
            badge = f"<sup>x{reps[e]}</sup>" if reps[e] > 1 else ""
            cells.append(f'<td title="layer {layer}, expert {e}: {count} tokens, {reps[e]} copies" '
                         f'style="background: rgb({shade},{shade},255); text-align:center">{count}{badge}</td>')
        rows.append(f"<tr><th>layer {html.escape(str(layer))}</th>{''.join(cells)}</tr>")
    return (f'<div class="raymoe-heatmap"><table style="border-collapse:collapse; font-size:11px">'
            f"<tr><th></th>{head}</tr>{''.join(rows)}</table>"
            f"<p>tokens per (layer, expert) over the recent window; x2 = two physical copies</p></div>")


def expert_bars_html(stats: dict) -> str:
    """Per expert actor: a bar of the rows it computed over the recent window, the rows since it
    started, and what it holds; above them the placement version and the measured max/mean."""
    experts = stats.get("experts") or []
    load = stats.get("expert_load") or {}
    version = stats.get("placement_version", 0)
    imbalance = load.get("imbalance")
    figure = "-" if imbalance is None else f"{imbalance:.2f}"
    head = (f"<p><b>Expert placement</b> version {version} &nbsp; <b>max/mean rows per expert actor</b> "
            f"{figure} (1.00 = even) &nbsp; rebalances {load.get('rebalances', 0)}, "
            f"{load.get('rebalance_seconds', 0.0):.1f} s spent</p>")
    if not experts:
        return f'<div class="raymoe-experts">{head}<p>No expert actor has reported yet.</p></div>'
    peak = max(e["rows_window"] for e in experts) or 1
    rows = []
    for e in experts:
        held = [x for slots in e["slots"].values() for x in slots if x is not None]
        pct = 100 * e["rows_window"] / peak
        rows.append(
            f'<tr><th>expert actor {e["index"]}</th>'
            f'<td style="width:320px"><div title="{e["rows_window"]} rows over the window" '
            f'style="background:#6c7cf0; height:12px; width:{pct:.0f}%"></div></td>'
            f'<td style="text-align:right">{e["rows_window"]}</td><td style="text-align:right">{e["rows_total"]}</td>'
            f"<td>{len(held)} expert copies</td></tr>")
    return (f'<div class="raymoe-experts">{head}<table style="font-size:12px">'
            "<tr><th></th><th>rows, recent window</th><th>window</th><th>since start</th><th>holds</th></tr>"
            f"{''.join(rows)}</table></div>")

"""The Cluster tab's expert panels and summary, from written-down stats dicts."""

import re

from ui.cluster_view import expert_bars_html, load_heatmap_html, summary_markdown

STATS = {
    "placement_version": 3,
    "expert_load": {"imbalance": 1.0432, "rebalances": 2, "rebalance_seconds": 4.25,
                    "window": {1: [90, 5, 3, 2]}, "replicas": {1: [2, 1, 1, 1]}},
    "experts": [
        {"index": 0, "rows_total": 1000, "rows_window": 50, "slots": {1: [0, 1, None]}},
        {"index": 1, "rows_total": 800, "rows_window": 25, "slots": {1: [2, 3, 0]}},
    ],
}


def test_bars_show_version_imbalance_and_relative_rows():
    page = expert_bars_html(STATS)
    assert "version 3" in page and "1.04" in page and "rebalances 2" in page and "4.2 s" in page
    widths = re.findall(r"width:(\d+)%", page)
    assert widths == ["100", "50"]
    assert "2 expert copies" in page and "3 expert copies" in page
    assert ">1000<" in page and ">800<" in page


def test_bars_before_any_report():
    page = expert_bars_html({"placement_version": 0, "expert_load": {}, "experts": []})
    assert "version 0" in page and "No expert actor has reported yet" in page and "max/mean rows per expert actor -" \
        in page.replace("</b> ", " ")


def test_heatmap_badges_replicated_experts():
    page = load_heatmap_html(STATS["expert_load"])
    assert page.count("<sup>x2</sup>") == 1 and "expert 0: 90 tokens, 2 copies" in page


def _stats(spec):
    return {"totals": {"steps": 3, "tokens_generated": 9}, "tokens_per_s": 1.0, "ttft_s": None, "tpot_s": 0.01,
            "preemptions": 0, "health": {"state": "healthy"}, "speculative": spec}


def test_summary_shows_acceptance():
    text = summary_markdown(_stats({"tokens": 2, "draft_tokens": 8, "accepted_tokens": 6, "acceptance_rate": 0.75}))
    assert "8 verified, 6 kept (acceptance 0.75)" in text
    assert "MTP" not in summary_markdown(_stats({"tokens": 0, "draft_tokens": 0, "accepted_tokens": 0,
                                                 "acceptance_rate": None}))
    assert "MTP" not in summary_markdown(_stats(None))

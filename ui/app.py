"""The Gradio app: a Chat tab and a Cluster tab, over the cluster's public API only."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import gradio as gr

from ui.chat import ChatError, stream_reply
from ui.cluster_view import actor_rows, expert_bars_html, load_heatmap_html, shard_rows, summary_markdown

log = logging.getLogger("raymoe.ui")


def build_app(llm, refresh_s: float = 2.0) -> gr.Blocks:
    def chat(message: str, history: list | None = None, system_prompt: str = "", temperature: float = 0.7,
             top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 256) -> Iterator[str]:
        """Stream a reply to ``message`` after ``history`` (optional: a list of {role, content} messages,
        content a string or a list of {"type": "text", "text": ...} parts)."""
        try:
            yield from stream_reply(llm, message, history, system_prompt, temperature, top_p, top_k, max_new_tokens)
        except ChatError as e:
            # a rejected input is one console line, not the traceback Gradio prints by default
            log.warning("chat request rejected: %s", " ".join(str(e).split()))
            raise gr.Error(str(e), print_exception=False) from None

    def respond(message, history, system_prompt, temperature, top_p, top_k, max_new_tokens):
        history = list(history or []) + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, ""
        for reply in chat(message, history[:-2], system_prompt, temperature, top_p, top_k, max_new_tokens):
            history[-1] = {"role": "assistant", "content": reply}
            yield history, ""

    def refresh():
        stats = llm.stats()
        return (summary_markdown(stats), shard_rows(stats), actor_rows(llm.cluster_info()),
                expert_bars_html(stats), load_heatmap_html(stats["expert_load"]))

    with gr.Blocks(title="raymoe", analytics_enabled=False) as app:
        info = llm.describe()
        gr.Markdown(f"## raymoe &nbsp; <small>{info['model']}: {info['model_type']}, "
                    f"{info['n_routed_experts']} experts, {info['attention_shards']} attention shard(s) x "
                    f"{info['expert_actors']} expert actor(s)</small>")
        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="raymoe-chatbot")
            with gr.Row():
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                                     elem_id="raymoe-message")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="raymoe-send")
                stop = gr.Button("Stop", scale=1, elem_id="raymoe-stop")
            with gr.Accordion("Settings", open=False):
                system_prompt = gr.Textbox(label="System prompt", value="")
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
                max_new_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
                clear = gr.Button("Clear conversation")
            inputs = [message, chatbot, system_prompt, temperature, top_p, top_k, max_new_tokens]
            events = [trigger(respond, inputs, [chatbot, message], api_visibility="private")
                      for trigger in (message.submit, send.click)]
            stop.click(None, None, None, cancels=events)
            clear.click(lambda: [], None, chatbot, api_visibility="private")
        with gr.Tab("Cluster"):
            summary = gr.Markdown()
            shards = gr.Dataframe(headers=["shard", "queued", "running", "cache blocks"], label="Attention shards",
                                  interactive=False)
            actors = gr.Dataframe(headers=["role", "index", "node ip", "node", "device", "state"], label="Actors",
                                  interactive=False)
            bars = gr.HTML()
            heatmap = gr.HTML()
            timer = gr.Timer(refresh_s)
            outputs = [summary, shards, actors, bars, heatmap]
            timer.tick(refresh, None, outputs, api_visibility="private")
            app.load(refresh, None, outputs, api_visibility="private")
        gr.api(chat, api_name="chat")
    return app

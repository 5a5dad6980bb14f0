"""``raymoe serve``: the cluster and its web page, until Ctrl-C."""

from __future__ import annotations

import signal
import threading

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "1kb"  # the page takes no files


def launch_options(args) -> dict:
    """``Blocks.launch`` arguments for ``raymoe serve``. Every setting that Gradio would otherwise take
    from the environment and that reaches beyond this machine is given here: a public share link
    only with ``--share --allow-remote`` (never from ``GRADIO_SHARE``), no MCP server, no Node server."""
    return dict(server_name=args.host, server_port=args.port, share=bool(args.share and args.allow_remote),
                max_file_size=MAX_UPLOAD, mcp_server=False, ssr_mode=False, prevent_thread_lock=True, quiet=True,
                show_error=True)


def main(args) -> int:
    from cluster.api import RayMoE
    from cluster.cli import _layout_overrides, _model_dir
    from ui.app import build_app

    if args.host not in LOOPBACK and not args.allow_remote:
        raise ValueError(f"--host {args.host} exposes the page beyond this machine; add --allow-remote to mean it")
    if args.share and not args.allow_remote:
        raise ValueError("--share opens a public link to the page; add --allow-remote to mean it")
    print("starting the cluster ...", flush=True)
    llm = RayMoE.start(_model_dir(args), args.layout, address=args.address, need_tokenizer=True,
                       **_layout_overrides(args))
    stop = threading.Event()
    try:
        app = build_app(llm, refresh_s=args.refresh)
        app.queue(default_concurrency_limit=args.max_sessions)
        app.launch(**launch_options(args))
        print(f"raymoe is serving {llm.model_dir.name} on {llm.layout.attention_shards} attention shard(s) x "
              f"{llm.layout.expert_actors} expert actor(s)")
        print(f"  chat and cluster page: {app.local_url}")
        if app.share_url:
            print(f"  public share link:     {app.share_url}")
        print(f"  Ray dashboard:         {llm.dashboard_url or 'not started by raymoe (joined cluster)'}")
        print("press Ctrl-C to stop", flush=True)
        # Ctrl-C and SIGTERM stop cleanly, also where SIGINT came in ignored (a background job)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print("stopping ...", flush=True)
        app.close()
    finally:
        llm.shutdown()
    print("stopped", flush=True)
    return 0

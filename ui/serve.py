"""``raymoe serve``: the cluster, its web page and the OpenAI-compatible API on one port, until Ctrl-C."""

from __future__ import annotations

import hmac
import os
import signal
import threading

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "1kb"  # the page takes no files


def launch_options(args, api_key: str | None = None) -> dict:
    """``Blocks.launch`` arguments for ``raymoe serve``. Every setting that Gradio would otherwise take
    from the environment and that reaches beyond this machine is given here: a public share link
    only with ``--share --allow-remote`` (never from ``GRADIO_SHARE``), no MCP server, no Node server.
    With ``--allow-remote`` and an API key the page and its ``/chat`` API ask for the key too (a login
    with any user name and the key as the password); on loopback they stay open."""
    options = dict(server_name=args.host, server_port=args.port, share=bool(args.share and args.allow_remote),
                   max_file_size=MAX_UPLOAD, mcp_server=False, ssr_mode=False, prevent_thread_lock=True, quiet=True,
                   show_error=True)
    if api_key and args.allow_remote:
        options.update(auth=lambda user, password: hmac.compare_digest(password.encode(), api_key.encode()),
                       auth_message="Log in with any user name and the server's API key as the password.")
    return options


def start_server(llm, launch: dict, refresh_s: float = 2.0, max_sessions: int = 64, api_key: str | None = None,
                 model_name: str | None = None):
    """The Gradio page with the OpenAI-compatible routes in front of it, in one server; returns the
    launched ``Blocks`` (``close()`` stops it)."""
    from ui.app import build_app
    from ui.openai_api import openai_routes

    app = build_app(llm, refresh_s=refresh_s)
    app.queue(default_concurrency_limit=max_sessions)
    app.launch(**launch, app_kwargs={"routes": openai_routes(llm, model_name=model_name, api_key=api_key)})
    return app


def check_serving_flags(args) -> None:
    """The page's flags, and that ``--host:--port`` can be bound now (it is bound again, for real,
    once the cluster is up: a port taken in between still fails then)."""
    import socket

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not args.refresh > 0:
        raise ValueError(f"--refresh must be > 0 seconds, got {args.refresh}")
    if args.max_sessions < 1:
        raise ValueError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port "
                         "or stop what uses it") from None


def main(args) -> int:
    from cluster.api import RayMoE
    from cluster.options import layout_overrides, model_dir

    if args.host not in LOOPBACK and not args.allow_remote:
        raise ValueError(f"--host {args.host} exposes the page beyond this machine; add --allow-remote to mean it")
    if args.share and not args.allow_remote:
        raise ValueError("--share opens a public link to the page; add --allow-remote to mean it")
    check_serving_flags(args)  # before the cluster starts, which may take minutes
    api_key = args.api_key or os.environ.get("RAYMOE_API_KEY") or None
    print("starting the cluster ...", flush=True)
    llm = RayMoE.start(model_dir(args), args.layout, address=args.address, need_tokenizer=True,
                       **layout_overrides(args))
    stop = threading.Event()
    try:
        app = start_server(llm, launch_options(args, api_key), args.refresh, args.max_sessions, api_key,
                           args.served_model_name)
        info = llm.describe()
        name = args.served_model_name or info["model"]
        print(f"raymoe is serving {name} on {info['attention_shards']} attention shard(s) x "
              f"{info['expert_actors']} expert actor(s), rows over {info['transport']}")
        print(f"  chat and cluster page: {app.local_url}")
        if not api_key:
            key = "no key: as open as the page"
        elif args.allow_remote:
            key = "key required; the page and its /chat API ask for it too"
        else:
            key = "key required; the page and its /chat API take no key (loopback only)"
        print(f"  OpenAI API:            {app.local_url.rstrip('/')}/v1 (model '{name}', {key})")
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

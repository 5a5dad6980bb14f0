"""``raymoe serve``: the cluster and its web page, until Ctrl-C."""

from __future__ import annotations

import signal
import threading


def main(args) -> int:
    from cluster.api import RayMoE
    from cluster.cli import _layout_overrides, _model_dir
    from ui.app import build_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise ValueError(f"--host {args.host} exposes the page beyond this machine; add --allow-remote to mean it")
    print("starting the cluster ...", flush=True)
    llm = RayMoE.start(_model_dir(args), args.layout, address=args.address, **_layout_overrides(args))
    stop = threading.Event()
    try:
        app = build_app(llm, refresh_s=args.refresh)
        app.queue(default_concurrency_limit=args.max_sessions)
        app.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                   show_error=True)
        print(f"raymoe is serving {llm.model_dir.name} on {llm.layout.attention_shards} attention shard(s) x "
              f"{llm.layout.expert_actors} expert actor(s)")
        print(f"  chat and cluster page: {app.local_url}")
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

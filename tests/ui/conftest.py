import os
import socket
import tempfile

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_dir):
    """Embedded Ray (metrics exported every second on a known port), the cluster on the tiny
    checkpoint, and the Gradio app on a free loopback port."""
    import ray

    from cluster.api import RayMoE
    from ui.serve import start_server

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    if ray.is_initialized():
        ray.shutdown()
    metrics_port = free_port()
    ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             _metrics_export_port=metrics_port, _temp_dir=tempfile.mkdtemp(prefix="rmu", dir="/tmp"))
    llm = RayMoE.start(tiny_dir, attention_shards=1, expert_actors=2, dtype="float32")
    port = free_port()
    app = start_server(llm, dict(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True),
                       refresh_s=1.0, max_sessions=16, api_key="test-key")
    yield {"llm": llm, "url": f"http://127.0.0.1:{port}/", "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    app.close()
    llm.shutdown()
    ray.shutdown()

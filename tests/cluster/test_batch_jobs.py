"""Batch generation against a real Ray head started by the test (and stopped by its own process id):
the command killed midway and re-run, and ``ray job submit``."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (the sockets are held together, so the OS cannot hand one out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_head():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}:{os.environ['PATH']}")
    port, dash = _free_ports(2)  # once the same port came back twice: GCS and dashboard collided
    temp = tempfile.mkdtemp(prefix="rmh", dir="/tmp")
    proc = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}",
                             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=8",
                             f"--temp-dir={temp}", "--include-dashboard=true"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", dash), timeout=1):
                break
        except OSError:
            time.sleep(1)
    time.sleep(3)
    yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(temp, ignore_errors=True)


def test_killed_batch_rerun_gives_every_id_once(ray_head, tiny_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 300  # long enough (~20 s here) to be killed midway
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"prompt number {i}", "max_new_tokens": 64})
                           + "\n" for i in range(n)))
    cmd = [str(Path(sys.executable).parent / "raymoe"), "batch", "--model", str(tiny_dir), "--input", str(inp),
           "--output", str(out), "--address", ray_head["address"], "--temperature", "0", "--ignore-eos",
           "--dtype", "float32", "--no-progress"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, env=ray_head["env"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    first.kill()  # midway
    first.wait()
    partial = len(out.read_text().splitlines()) if out.exists() else 0
    assert 3 <= partial < n, (tmp_path / "first.log").read_text()[-3000:]
    second = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "already done" in second.stdout
    ids = [r["id"] for r in _read(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n)) and len(ids) == n


def test_ray_job_submit_runs_a_batch(ray_head, tiny_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "j1", "prompt": "Hello"}) + "\n{broken\n")
    repo = Path(__file__).resolve().parents[2]
    job = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["dashboard"],
         "--working-dir", str(repo), "--", "raymoe", "batch", "--model", str(tiny_dir), "--input", str(inp),
         "--output", str(out), "--max-new-tokens", "5", "--temperature", "0"],
        env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "batch done: 1 ok, 1 failed" in job.stdout
    records = {r["id"]: r for r in _read(out)}
    assert set(records) == {"j1", None} and len(records["j1"]["output_ids"]) == 5 and records[None]["line"] == 2

"""Embedded Ray started by raymoe for a loopback page listens on 127.0.0.1 only (GCS, raylet,
dashboard, workers), not on every interface."""

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json, os
    from pathlib import Path
    import ray
    from cluster.api import _ensure_ray

    started, _ = _ensure_ray(None, loopback=True)

    @ray.remote
    def ping():
        return ray.util.get_node_ip_address()

    worker_ip = ray.get(ping.remote())

    def tree(root):
        kids = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                kids.setdefault(ppid, []).append(int(p.name))
        out, todo = set(), [root]
        while todo:
            pid = todo.pop()
            out.add(pid)
            todo += kids.get(pid, [])
        return out

    inodes = set()
    for pid in tree(os.getpid()):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:
                listening.append(cols[1].split(":")[0])
    print(json.dumps({"started": started, "node": ray.nodes()[0]["NodeManagerAddress"], "worker": worker_ip,
                      "listening": listening}))
    ray.shutdown()
""")

LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_embedded_ray_listens_on_loopback_only():
    import json

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=tempfile.mkdtemp(prefix="rml", dir="/tmp"))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["started"] and info["node"] == "127.0.0.1" and info["worker"] == "127.0.0.1"
    assert len(info["listening"]) >= 3  # GCS, raylet, dashboard at least
    assert set(info["listening"]) <= LOOPBACK, info["listening"]

"""``raymoe serve`` (the README's main command): the page comes up, prints where it is, and Ctrl-C
stops the page, the cluster and the embedded Ray it started."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ui.conftest import free_port

pytestmark = pytest.mark.slow


def test_serve_starts_and_stops_cleanly_on_ctrl_c(tiny_dir):
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "raymoe"), "serve", "--model", str(tiny_dir),
                             "--port", str(port), "--dtype", "float32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}" in out and "Ray dashboard" in out, out
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "raymoe" in page.lower() or "gradio" in page.lower()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-2000:]
    assert "stopped" in rest
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)

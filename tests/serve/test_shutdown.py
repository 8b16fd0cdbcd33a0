"""`dlmc serve` as a process: SIGTERM lets the running and the queued requests finish, then exits 0;
a bad model path is one line and exit 2."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.serve.conftest import NAME

CLI = [sys.executable, "-c", "from dlmc.cli import app; app()", "serve"]


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_exits_0():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # one intra-op thread: on a shared 2-core machine a second one makes each step 10x slower
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([*CLI, "--port", str(port), "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                              env=env)
    try:
        def up() -> bool:
            assert server.poll() is None, server.stderr.read()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "the server did not start", timeout=60)
        body = {"model": NAME, "prompt": "count 417:", "max_tokens": 128, "steps": 128}
        replies = {}

        def plain():
            replies["plain"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

        def streamed():  # other settings: it cannot join the running batch, so it waits in the queue
            short = body | {"max_tokens": 16, "steps": 16, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=short, timeout=60) as r:
                replies["stream"] = (r.status_code, [line for line in r.iter_lines() if line])

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        threads[0].start()
        wait_until(lambda: httpx.get(f"{url}/health").json()["running"], "the first request never ran")
        threads[1].start()
        wait_until(lambda: httpx.get(f"{url}/health").json()["queued"], "the second request was not queued")
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert server.wait(60) == 0, server.stderr.read()
    finally:
        server.kill()
    assert replies["plain"].status_code == 200 and replies["plain"].json()["choices"][0]["text"]
    status, lines = replies["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"


def test_bad_model_path_is_one_line(tmp_path):
    result = subprocess.run([*CLI, str(tmp_path / "missing")], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1

"""Starts the real llmesh sidecar (and the project's fake upstream) for the SDK tests.

Binaries come from LLMESH_BIN_DIR (default: target/debug of this checkout).
"""

import json
import os
import pathlib
import subprocess
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN_DIR = pathlib.Path(os.environ.get("LLMESH_BIN_DIR", ROOT / "target" / "debug"))
UPSTREAM_KEY = "sk-upstream-secret-for-tests"


def _start(args, ready, stream_name):
    """Starts a process and waits for the line `ready(line)` accepts; returns (proc, value, lines)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stream = getattr(proc, stream_name)
    lines = []
    found = threading.Event()
    result = {}

    def pump():
        for line in stream:
            lines.append(line)
            if not found.is_set():
                value = ready(line)
                if value is not None:
                    result["value"] = value
                    found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(timeout=20):
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start:\n{''.join(lines)}")
    return proc, result["value"], lines


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def fake_upstream():
    def ready(line):
        return line.split("listening on ", 1)[1].strip() if line.startswith("listening on ") else None

    proc, addr, _ = _start([str(BIN_DIR / "llmesh-fake-upstream"), "--listen", "127.0.0.1:0"], ready, "stdout")
    yield f"http://{addr}/v1"
    _stop(proc)


class Sidecar:
    def __init__(self, base_url, admin_url, logs):
        self.base_url = base_url
        self.admin_url = admin_url
        self._logs = logs

    def logs(self):
        return "".join(self._logs)


@pytest.fixture(scope="session")
def sidecar(tmp_path_factory, fake_upstream):
    tmp = tmp_path_factory.mktemp("sidecar")
    key = tmp / "upstream-key"
    key.write_text(UPSTREAM_KEY + "\n")
    config = tmp / "config.yaml"
    config.write_text(
        f"""
endpoints:
  - name: chat
    provider: mock
    model: mock-gpt
    aliases: [gpt-4o-mini]
    maxRequestBodyBytes: 100000
    mock: {{completionTokens: 12}}
  - name: embed
    provider: mock
    model: mock-embedding
    aliases: [text-embedding-3-small]
    mock: {{embeddingDimensions: 64}}
  - name: limited
    provider: mock
    model: mock-limited
    limits: {{requestsPerMinute: 1, queueTimeout: 0ms}}
  - name: relay
    provider: openai-compatible
    baseUrl: {fake_upstream}
    model: relayed-model
    credential: {{file: {key}}}
"""
    )

    def ready(line):
        try:
            event = json.loads(line)
        except ValueError:
            return None
        return (event["app"], event["admin"]) if event.get("message") == "listening" else None

    args = [
        str(BIN_DIR / "llmesh-sidecar"),
        "--config", str(config),
        "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--log-format", "json",
    ]
    proc, (app, admin), lines = _start(args, ready, "stderr")
    yield Sidecar(f"http://{app}/v1", f"http://{admin}", lines)
    _stop(proc)
    assert proc.returncode == 0, "the sidecar exits 0 on SIGTERM"

"""Starts the real llmesh sidecar (and the project's fake upstream) for the SDK tests.

Binaries come from LLMESH_BIN_DIR (default: target/debug of this checkout).
"""

import json
import os
import pathlib
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN_DIR = pathlib.Path(os.environ.get("LLMESH_BIN_DIR", ROOT / "target" / "debug"))
UPSTREAM_KEY = "sk-upstream-secret-for-tests"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
LOCAL_MODEL = "llama"


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


class FakeUpstream:
    """The project's fake provider (tests/testkit): OpenAI chat completions and Anthropic messages."""

    def __init__(self, addr):
        self.root = f"http://{addr}"
        # OpenAI-style endpoints include the version; Anthropic's base URL is the root.
        self.base_url = f"{self.root}/v1"

    def requests(self):
        """What the fake received, credentials shown as their fingerprint()."""
        with urllib.request.urlopen(self.root + "/_fake/requests") as response:
            return json.load(response)

    def request_with_id(self, request_id):
        """The requests the sidecar sent for the app's call with this x-request-id."""
        return [r for r in self.requests() if r["headers"].get("x-request-id") == request_id]


def fingerprint(key):
    """The fake's fingerprint of a key: `fnv1a64:` and its 64-bit FNV-1a hash in hex."""
    h = 0xCBF29CE484222325
    for byte in key.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"fnv1a64:{h:016x}"


@pytest.fixture(scope="session")
def fake_upstream():
    def ready(line):
        return line.split("listening on ", 1)[1].strip() if line.startswith("listening on ") else None

    args = [str(BIN_DIR / "llmesh-fake-upstream"), "--listen", "127.0.0.1:0", "--record"]
    proc, addr, _ = _start(args, ready, "stdout")
    yield FakeUpstream(addr)
    _stop(proc)


class Sidecar:
    def __init__(self, base_url, admin_url, logs):
        self.base_url = base_url
        self.root = base_url.removesuffix("/v1")
        self.admin_url = admin_url
        self._logs = logs

    def logs(self):
        # The sidecar writes its log in batches 20 ms apart: wait for the one in flight, with
        # room for a busy machine.
        time.sleep(0.1)
        return "".join(self._logs)

    def metrics(self):
        """The admin port's /metrics as {(name, frozenset of label pairs): value}."""
        with urllib.request.urlopen(self.admin_url + "/metrics") as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            pairs = frozenset(_LABEL.findall(labels))
            samples[(name, pairs)] = float(value)
        return samples


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _start_sidecar(tmp, config_text):
    config = tmp / "config.yaml"
    config.write_text(config_text)

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
    return proc, Sidecar(f"http://{app}/v1", f"http://{admin}", lines)


@pytest.fixture(scope="session")
def sidecar(tmp_path_factory, fake_upstream):
    tmp = tmp_path_factory.mktemp("sidecar")
    key = tmp / "upstream-key"
    key.write_text(UPSTREAM_KEY + "\n")
    proc, sidecar = _start_sidecar(
        tmp,
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
    baseUrl: {fake_upstream.base_url}
    model: relayed-model
    credential: {{file: {key}}}
""",
    )
    yield sidecar
    _stop(proc)
    assert proc.returncode == 0, "the sidecar exits 0 on SIGTERM"


@pytest.fixture(scope="session")
def dialects(tmp_path_factory, fake_upstream):
    """A sidecar with an Anthropic endpoint and an OpenAI-style one on the fake upstream, each
    also rate limited (one request a minute) and fragile (its circuit opens on one failure)."""
    tmp = tmp_path_factory.mktemp("dialects")
    key = tmp / "upstream-key"
    key.write_text(UPSTREAM_KEY + "\n")
    fragile = "retry: {maxAttempts: 1}\n    circuitBreaker: {consecutiveFailures: 1, cooldown: 10m}"
    limited = "limits: {requestsPerMinute: 1, queueTimeout: 0ms}"
    endpoints = []
    for suffix, extra in [("", ""), ("-limited", limited), ("-fragile", fragile)]:
        endpoints.append(
            f"""
  - name: claude{suffix}
    provider: anthropic
    model: {ANTHROPIC_MODEL}
    baseUrl: {fake_upstream.root}
    credential: {{file: {key}}}
    {extra}
  - name: local{suffix}
    provider: openai-compatible
    model: {LOCAL_MODEL}
    baseUrl: {fake_upstream.base_url}
    credential: {{file: {key}}}
    {extra}"""
        )
    proc, sidecar = _start_sidecar(tmp, "endpoints:" + "".join(endpoints) + "\n")
    yield sidecar
    _stop(proc)
    assert proc.returncode == 0, "the sidecar exits 0 on SIGTERM"


# What the fake upstream answers (tests/testkit/src/lib.rs, module `usage`): fixed usage, and
# in streams as many output tokens as chunks.
CHAT_USAGE = (10, 20)
ANTHROPIC_USAGE = (12, 5)
ANTHROPIC_CACHE = {"cache_creation_input_tokens": 2, "cache_read_input_tokens": 3}
TOOL_RESULT = "sunny, 21C"
TOOLS = ["get_weather", "get_time"]


def stream_output_tokens(provider, kind):
    """Output tokens the fake reports for a stream: one per chunk. `kind`: text, tools (two
    parallel calls) or reply (the answer to tool results)."""
    if kind == "text":
        return 5
    if kind == "reply":
        return 2
    return 1 + 3 * len(TOOLS) if provider == "chat" else 4 * len(TOOLS)


def tool_arguments(name):
    """The arguments the fake calls a tool with."""
    return {"city": "Paris", "tool": name}


class Measured:
    """What one call added to the sidecar's metrics for one endpoint."""

    def __init__(self, sidecar, endpoint):
        self._sidecar = sidecar
        self._endpoint = endpoint
        self._before = sidecar.metrics()
        self._after = None

    def _total(self, samples, name, **labels):
        wanted = {("endpoint", self._endpoint), *labels.items()}
        return sum(v for (n, pairs), v in samples.items() if n == name and wanted <= pairs)

    def delta(self, name, **labels):
        """The change since construction, once the call is counted: a stream is counted when
        it ends, which may be just after the app read its last event (waits up to 3 s)."""
        if self._after is None:
            deadline = time.monotonic() + 3
            while True:
                self._after = self._sidecar.metrics()
                counted = self._change(self._after, "llmesh_requests_total")
                if counted or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        return self._change(self._after, name, **labels)

    def _change(self, now, name, **labels):
        return self._total(now, name, **labels) - self._total(self._before, name, **labels)

    def tokens(self, token_type):
        return self.delta("gen_ai_client_token_usage_sum", token_type=token_type)

    def cache_tokens(self, kind):
        """Prompt-cache tokens (kind: read or write), also counted in the input tokens."""
        return self.delta("llmesh_prompt_cache_tokens_total", kind=kind)

    def first_chunks(self):
        return self.delta("gen_ai_client_operation_time_to_first_chunk_seconds_count")


def _post(url, body, headers):
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="session")
def open_circuits(dialects):
    """Opens the circuit of both fragile endpoints: one failed attempt is enough for them."""
    failing = {"x-fake-status": "500"}
    anthropic_headers = {**failing, "anthropic-version": "2023-06-01"}
    claude = b'{"model": "claude-fragile", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}'
    local = b'{"model": "local-fragile", "messages": [{"role": "user", "content": "hi"}]}'
    assert _post(dialects.root + "/v1/messages", claude, anthropic_headers) in {500, 503}
    assert _post(dialects.base_url + "/chat/completions", local, failing) in {500, 503}

"""The official @anthropic-ai/sdk Node client, once, streaming through the sidecar (the
script is tests/node/anthropic-stream.mjs; `npm ci --prefix tests/node` installs the SDK)."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import ANTHROPIC_MODEL, ANTHROPIC_USAGE, LOCAL_MODEL, ROOT, stream_output_tokens

NODE_DIR = ROOT / "tests" / "node"


@pytest.mark.parametrize(
    "endpoint, model, input_tokens",
    [("claude", ANTHROPIC_MODEL, ANTHROPIC_USAGE[0]), ("local", LOCAL_MODEL, 10)],
)
def test_the_node_sdk_streams_a_message(dialects, endpoint, model, input_tokens):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "@anthropic-ai" / "sdk").is_dir():
        pytest.skip("the Node SDK is not installed: run npm ci --prefix tests/node")
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": dialects.root,
        "ANTHROPIC_API_KEY": "sk-ant-node-app-placeholder",
        "LLMESH_MODEL": endpoint,
        "LLMESH_EXPECT_MODEL": model,
        "LLMESH_EXPECT_DELTAS": json.dumps([f"tok{i} " for i in range(5)]),
        "LLMESH_EXPECT_INPUT_TOKENS": str(input_tokens),
        "LLMESH_EXPECT_OUTPUT_TOKENS": str(stream_output_tokens("anthropic" if endpoint == "claude" else "chat", "text")),
    }
    run = subprocess.run(
        [node, "anthropic-stream.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["ok"] is True

"""The official openai Python SDK as a client of the llmesh sidecar."""

import json
import urllib.request

import openai
import pytest

from conftest import UPSTREAM_KEY


@pytest.fixture()
def client(sidecar):
    # The app's key is whatever it likes: the sidecar drops it and adds the endpoint's own.
    return openai.OpenAI(base_url=sidecar.base_url, api_key="sk-app-placeholder", max_retries=0)


def test_models_come_from_the_config(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["chat", "gpt-4o-mini", "embed", "text-embedding-3-small", "limited", "relay"]
    assert client.models.retrieve("gpt-4o-mini").owned_by == "llmesh:mock"


def test_chat_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello, mesh"}]
    )
    assert raw.headers["x-llmesh-endpoint"] == "chat"
    assert len(raw.headers["x-request-id"]) == 36
    completion = raw.parse()
    assert completion.model == "mock-gpt"
    assert completion.choices[0].finish_reason == "stop"
    assert len(completion.choices[0].message.content.split(" ")) == 12
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_streaming_chat_matches_the_non_streamed_answer(client):
    messages = [{"role": "user", "content": "Stream me something"}]
    whole = client.chat.completions.create(model="chat", messages=messages).choices[0].message.content
    stream = client.chat.completions.create(
        model="chat", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole
    assert len(pieces) == 12, "one event per token"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 12


def test_embeddings_in_the_sdks_default_base64_and_as_floats(client):
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    default = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert [len(d.embedding) for d in default.data] == [64, 64]
    floats = client.embeddings.create(model="embed", input="alpha", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(default.data[0].embedding, rel=1e-6)
    assert default.usage.prompt_tokens == 3  # ceil(5/4) + ceil(4/4)


def test_unknown_model_is_a_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-9-turbo", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "model_not_found"
    assert "gpt-9-turbo" in raised.value.message


def test_oversized_body_is_a_413_with_a_clear_message(client):
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x" * 200_000}])
    assert raised.value.status_code == 413
    assert "100000 bytes" in raised.value.message


def test_upstream_429_reaches_the_sdk_as_rate_limit_error(client, sidecar):
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(
            model="relay",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-status": "429"},
        )
    assert raised.value.code == "fake_429"


def test_the_sidecars_own_rate_limit_is_a_rate_limit_error_naming_the_limit(client):
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="limited", messages=messages)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="limited", messages=messages)
    assert raised.value.code == "rate_limit_exceeded"
    assert raised.value.type == "requests"
    assert (
        "Rate limit reached for endpoint 'limited' on requests per minute (limit 1)." in raised.value.message
    ), raised.value.message
    # The SDK's own retry logic waits for Retry-After; one minute's worth of one request.
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 60
    assert raised.value.response.headers["x-llmesh-limit"] == "requests_per_minute"


def test_relayed_stream_that_breaks_raises_in_the_sdk(client):
    stream = client.chat.completions.create(
        model="relay",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-fake-stream-chunks": "10", "x-fake-fail-after-chunks": "3"},
    )
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["tok0 ", "tok1 ", "tok2 "]
    assert "failed in the middle of the response" in raised.value.message


def test_keys_never_reach_logs_or_responses(client, sidecar):
    raw = client.chat.completions.with_raw_response.create(model="relay", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().model == "relayed-model"
    assert UPSTREAM_KEY not in raw.text
    assert UPSTREAM_KEY not in sidecar.logs()
    assert "sk-app-placeholder" not in sidecar.logs()
    with urllib.request.urlopen(sidecar.admin_url + "/readyz") as response:
        ready = json.load(response)
    assert ready["status"] == "ready"
    assert UPSTREAM_KEY not in str(ready)

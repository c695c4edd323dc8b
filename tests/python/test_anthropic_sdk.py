"""The official anthropic Python SDK as a client of the llmesh sidecar: natively to an
Anthropic endpoint, and translated to an OpenAI-style one (the fake upstream's chat
completions), streamed and not, with tool calls; what the upstream received; each error."""

import uuid

import anthropic
import pytest

from conftest import (
    ANTHROPIC_CACHE,
    ANTHROPIC_MODEL,
    ANTHROPIC_USAGE,
    CHAT_USAGE,
    LOCAL_MODEL,
    TOOL_RESULT,
    TOOLS,
    UPSTREAM_KEY,
    Measured,
    fingerprint,
    stream_output_tokens,
    tool_arguments,
)

APP_KEY = "sk-ant-app-placeholder"
APP_BEARER = "sk-app-bearer-placeholder"
# The upstream each endpoint reaches: "anthropic" (the fake's /v1/messages) or "chat".
UPSTREAM = {"claude": "anthropic", "local": "chat"}
MODEL = {"claude": ANTHROPIC_MODEL, "local": LOCAL_MODEL}


@pytest.fixture()
def client(dialects):
    # Like the official SDKs in some setups, the app sends its own key twice: as x-api-key
    # and as a bearer token. The sidecar must drop both.
    return anthropic.Anthropic(
        base_url=dialects.root,
        api_key=APP_KEY,
        default_headers={"Authorization": f"Bearer {APP_BEARER}"},
        max_retries=0,
    )


def ask(client, endpoint, messages, streamed, **extra):
    """One call; returns (message, text pieces as streamed or None)."""
    params = dict(model=endpoint, max_tokens=256, messages=messages, **extra)
    if not streamed:
        return client.messages.create(**params), None
    with client.messages.stream(**params) as stream:
        pieces = list(stream.text_stream)
        return stream.get_final_message(), pieces


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


def expected_usage(endpoint, streamed, kind):
    """(input, output) tokens the SDK must report, from the fake's fixed usage."""
    upstream = UPSTREAM[endpoint]
    prompt, completion = ANTHROPIC_USAGE if upstream == "anthropic" else CHAT_USAGE
    if streamed:
        completion = stream_output_tokens(upstream, kind)
    return prompt, completion


def assert_usage(message, endpoint, streamed, kind):
    assert (message.usage.input_tokens, message.usage.output_tokens) == expected_usage(endpoint, streamed, kind)
    if UPSTREAM[endpoint] == "anthropic":
        for field, value in ANTHROPIC_CACHE.items():
            assert getattr(message.usage, field) == value, field


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["claude", "local"])
def test_text(client, dialects, endpoint, streamed):
    measured = Measured(dialects, endpoint)
    message, pieces = ask(client, endpoint, [{"role": "user", "content": "Hello, Claude"}], streamed)
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL[endpoint]
    assert message.stop_reason == "end_turn"
    text = text_of(message)
    if streamed:
        assert pieces == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]
        assert text == "".join(pieces)
    elif UPSTREAM[endpoint] == "anthropic":
        assert text == "tok0 tok1 tok2 tok3 tok4 "
    else:
        assert text and set(text) == {"x"}, text
    assert_usage(message, endpoint, streamed, "text")
    # The metrics count what the upstream reported, cached prompt tokens as input too.
    cache_read = message.usage.cache_read_input_tokens or 0
    cache_write = message.usage.cache_creation_input_tokens or 0
    assert measured.tokens("input") == message.usage.input_tokens + cache_read + cache_write
    assert measured.tokens("output") == message.usage.output_tokens
    assert measured.cache_tokens("read") == cache_read
    assert measured.cache_tokens("write") == cache_write
    assert measured.first_chunks() == (1 if streamed else 0)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["claude", "local"])
def test_tool_round(client, dialects, endpoint, streamed):
    tools = [
        {
            "name": name,
            "description": f"{name} for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
        for name in TOOLS
    ]
    question = {"role": "user", "content": "Weather and time in Paris?"}
    measured = Measured(dialects, endpoint)
    first, _ = ask(client, endpoint, [question], streamed, tools=tools)
    assert first.stop_reason == "tool_use"
    uses = [block for block in first.content if block.type == "tool_use"]
    assert [use.name for use in uses] == TOOLS, "two parallel calls"
    for use in uses:
        assert use.input == tool_arguments(use.name)
    assert len({use.id for use in uses}) == 2
    assert_usage(first, endpoint, streamed, "tools")
    assert measured.tokens("output") == first.usage.output_tokens

    history = [
        question,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": u.id, "name": u.name, "input": u.input} for u in uses],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": u.id, "content": TOOL_RESULT} for u in uses],
        },
    ]
    second, _ = ask(client, endpoint, history, streamed, tools=tools)
    assert second.stop_reason == "end_turn"
    assert text_of(second) == f"The tool said: {TOOL_RESULT} {TOOL_RESULT}"
    assert_usage(second, endpoint, streamed, "reply")


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["claude", "local"])
def test_the_upstream_gets_the_endpoint_s_key_and_never_the_app_s(client, fake_upstream, endpoint, streamed):
    request_id = str(uuid.uuid4())
    ask(client, endpoint, [{"role": "user", "content": "hi"}], streamed, extra_headers={"x-request-id": request_id})
    (received,) = fake_upstream.request_with_id(request_id)
    headers = received["headers"]
    every_value = " ".join(headers.values())
    assert APP_KEY not in every_value and APP_BEARER not in every_value
    assert fingerprint(APP_KEY) not in every_value and fingerprint(APP_BEARER) not in every_value
    if UPSTREAM[endpoint] == "anthropic":
        assert received["path"] == "/v1/messages"
        assert headers["x-api-key"] == fingerprint(UPSTREAM_KEY)
        # The SDK sends its own version, which the sidecar keeps.
        assert headers["anthropic-version"]
        assert "authorization" not in headers
    else:
        assert received["path"] == "/v1/chat/completions"
        assert headers["authorization"] == f"Bearer {fingerprint(UPSTREAM_KEY)}"
        assert "x-api-key" not in headers
        assert received["body"]["messages"][-1]["content"] == "hi"
    assert received["body"]["model"] == MODEL[endpoint]
    assert received["body"].get("stream", False) == streamed


def test_keys_never_reach_the_sidecar_s_log(client, dialects):
    ask(client, "claude", [{"role": "user", "content": "hi"}], False)
    logs = dialects.logs()
    assert UPSTREAM_KEY not in logs and APP_KEY not in logs and APP_BEARER not in logs


def test_a_parameter_with_no_chat_equivalent_is_a_bad_request_error_naming_it(client):
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(
            model="local", max_tokens=10, extra_body={"top_k": 5}, messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.status_code == 400
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "top_k" in raised.value.message


def test_an_unknown_model_is_a_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="claude-9-opus", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["error"]["type"] == "not_found_error"
    assert "claude-9-opus" in raised.value.message


@pytest.mark.parametrize("endpoint", ["claude-limited", "local-limited"])
def test_the_sidecar_s_rate_limit_is_a_rate_limit_error(client, endpoint):
    with pytest.raises(anthropic.RateLimitError) as raised:
        # One request a minute: the first may pass (unless the OpenAI SDK's test used it).
        for _ in range(2):
            client.messages.create(model=endpoint, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["error"]["type"] == "rate_limit_error"
    assert f"'{endpoint}'" in raised.value.message
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 60


@pytest.mark.parametrize("endpoint", ["claude-fragile", "local-fragile"])
def test_an_open_circuit_is_a_503_internal_server_error(client, open_circuits, endpoint):
    with pytest.raises(anthropic.InternalServerError) as raised:
        client.messages.create(model=endpoint, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 503
    assert isinstance(raised.value, anthropic.ServiceUnavailableError)
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] in {"overloaded_error", "api_error"}


def test_an_upstream_overloaded_error_reaches_the_sdk(client):
    with pytest.raises(anthropic.APIStatusError) as raised:
        client.messages.create(
            model="claude",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-status": "529"},
        )
    assert raised.value.status_code == 529
    assert raised.value.body["error"]["type"] == "overloaded_error"

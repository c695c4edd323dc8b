"""The official openai Python SDK across dialects: chat completions natively to an
OpenAI-style endpoint and translated to an Anthropic one, streamed and not, with tool calls;
and the Responses API translated to chat completions for a server that only serves those
(the fake upstream answers /v1/responses with 404, like llama.cpp)."""

import json
import uuid

import openai
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

APP_KEY = "sk-app-placeholder"
UPSTREAM = {"claude": "anthropic", "local": "chat"}
MODEL = {"claude": ANTHROPIC_MODEL, "local": LOCAL_MODEL}
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    for name in TOOLS
]


@pytest.fixture()
def client(dialects):
    return openai.OpenAI(base_url=dialects.base_url, api_key=APP_KEY, max_retries=0)


class Answer:
    """A chat completion's text, tool calls, finish reason and usage, streamed or not."""

    def __init__(self, text, calls, finish_reason, usage, model, pieces=None):
        self.text, self.calls, self.finish_reason = text, calls, finish_reason
        self.usage, self.model, self.pieces = usage, model, pieces


def chat(client, endpoint, messages, streamed, **extra):
    params = dict(model=endpoint, messages=messages, **extra)
    if not streamed:
        completion = client.chat.completions.create(**params)
        choice = completion.choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return Answer(choice.message.content, calls, choice.finish_reason, completion.usage, completion.model)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **params)
    pieces, calls, finish, usage, model = [], {}, None, None, None
    for chunk in stream:
        model = chunk.model or model
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, ["", "", ""])
                entry[0] += call.id or ""
                if call.function:
                    entry[1] += call.function.name or ""
                    entry[2] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    ordered = [tuple(calls[i]) for i in sorted(calls)]
    return Answer("".join(pieces), ordered, finish, usage, model, pieces)


def expected_usage(endpoint, streamed, kind):
    """(prompt, completion) tokens the SDK must report, from the fake's fixed usage."""
    upstream = UPSTREAM[endpoint]
    if upstream == "anthropic":
        # OpenAI counts cached prompt tokens in prompt_tokens; Anthropic reports them apart.
        prompt = ANTHROPIC_USAGE[0] + sum(ANTHROPIC_CACHE.values())
        completion = ANTHROPIC_USAGE[1]
    else:
        prompt, completion = CHAT_USAGE
    if streamed:
        completion = stream_output_tokens(upstream, kind)
    return prompt, completion


def assert_usage(answer, endpoint, streamed, kind):
    assert answer.usage is not None
    got = (answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert got == expected_usage(endpoint, streamed, kind)
    assert answer.usage.total_tokens == sum(got)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["claude", "local"])
def test_chat_text(client, dialects, endpoint, streamed):
    measured = Measured(dialects, endpoint)
    answer = chat(client, endpoint, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], streamed)
    assert answer.model == MODEL[endpoint]
    assert answer.finish_reason == "stop"
    if streamed:
        assert answer.pieces == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]
    elif UPSTREAM[endpoint] == "anthropic":
        assert answer.text == "tok0 tok1 tok2 tok3 tok4 "
    else:
        assert answer.text and set(answer.text) == {"x"}
    assert answer.calls == []
    assert_usage(answer, endpoint, streamed, "text")
    if UPSTREAM[endpoint] == "anthropic":
        assert answer.usage.prompt_tokens_details.cached_tokens == ANTHROPIC_CACHE["cache_read_input_tokens"]
    assert measured.tokens("input") == answer.usage.prompt_tokens
    assert measured.tokens("output") == answer.usage.completion_tokens
    if UPSTREAM[endpoint] == "anthropic":
        assert measured.cache_tokens("read") == ANTHROPIC_CACHE["cache_read_input_tokens"]
        assert measured.cache_tokens("write") == ANTHROPIC_CACHE["cache_creation_input_tokens"]
    assert measured.first_chunks() == (1 if streamed else 0)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["claude", "local"])
def test_chat_tool_round(client, endpoint, streamed):
    question = {"role": "user", "content": "Weather and time in Paris?"}
    first = chat(client, endpoint, [question], streamed, tools=CHAT_TOOLS)
    assert first.finish_reason == "tool_calls"
    assert [name for _, name, _ in first.calls] == TOOLS, "two parallel calls"
    for _, name, arguments in first.calls:
        assert json.loads(arguments) == tool_arguments(name)
    assert len({call_id for call_id, _, _ in first.calls}) == 2
    assert_usage(first, endpoint, streamed, "tools")

    history = [
        question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in first.calls
            ],
        },
        *({"role": "tool", "tool_call_id": i, "content": TOOL_RESULT} for i, _, _ in first.calls),
    ]
    second = chat(client, endpoint, history, streamed, tools=CHAT_TOOLS)
    assert second.finish_reason == "stop"
    assert second.text == f"The tool said: {TOOL_RESULT} {TOOL_RESULT}"
    assert_usage(second, endpoint, streamed, "reply")


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_anthropic_upstream_gets_its_key_and_version_and_never_the_app_s_key(client, fake_upstream, streamed):
    request_id = str(uuid.uuid4())
    chat(client, "claude", [{"role": "user", "content": "hi"}], streamed, extra_headers={"x-request-id": request_id})
    (received,) = fake_upstream.request_with_id(request_id)
    headers = received["headers"]
    assert received["path"] == "/v1/messages"
    assert headers["x-api-key"] == fingerprint(UPSTREAM_KEY)
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    assert fingerprint(APP_KEY) not in " ".join(headers.values())
    body = received["body"]
    assert body["model"] == ANTHROPIC_MODEL
    assert body["max_tokens"] > 0, "Anthropic requires max_tokens: the sidecar sets its default"
    assert body["messages"][-1]["role"] == "user"


def test_a_parameter_with_no_anthropic_equivalent_is_a_bad_request_error_naming_it(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="claude", n=2, messages=[{"role": "user", "content": "hi"}])
    assert "'n'" in raised.value.message


def test_an_unknown_model_is_a_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="claude-9-opus", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "model_not_found"


@pytest.mark.parametrize("endpoint", ["claude-limited", "local-limited"])
def test_the_sidecar_s_rate_limit_is_a_rate_limit_error(client, endpoint):
    with pytest.raises(openai.RateLimitError) as raised:
        # One request a minute: the first may pass (unless the Anthropic SDK's test used it).
        for _ in range(2):
            client.chat.completions.create(model=endpoint, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "rate_limit_exceeded"
    assert f"'{endpoint}'" in raised.value.message


@pytest.mark.parametrize("endpoint", ["claude-fragile", "local-fragile"])
def test_an_open_circuit_is_a_503_internal_server_error(client, open_circuits, endpoint):
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=endpoint, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 503
    assert raised.value.code == "circuit_open"


# The Responses API on `local` (openai-compatible: translated to chat completions by default).

RESPONSE_TOOLS = [
    {
        "type": "function",
        "name": name,
        "description": f"{name} for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    for name in TOOLS
]


def respond(client, streamed, **params):
    """One responses.create; returns (response, text deltas as streamed or None)."""
    if not streamed:
        return client.responses.create(model="local", **params), None
    deltas, final = [], None
    for event in client.responses.create(model="local", stream=True, **params):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            final = event.response
    assert final is not None, "the stream ends with response.completed"
    return final, deltas


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_responses_text_on_a_chat_only_server(client, dialects, fake_upstream, streamed):
    measured = Measured(dialects, "local")
    request_id = str(uuid.uuid4())
    response, deltas = respond(
        client, streamed, instructions="Be brief.", input="Hello", extra_headers={"x-request-id": request_id}
    )
    assert response.status == "completed"
    if streamed:
        assert deltas == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]
        assert response.output_text == "".join(deltas)
    else:
        assert response.output_text and set(response.output_text) == {"x"}
    prompt, completion = CHAT_USAGE
    if streamed:
        completion = stream_output_tokens("chat", "text")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, completion)
    assert response.usage.total_tokens == prompt + completion
    assert measured.tokens("output") == completion
    assert measured.first_chunks() == (1 if streamed else 0)
    # What the chat-only server got: chat completions, the instructions as a system message.
    (received,) = fake_upstream.request_with_id(request_id)
    assert received["path"] == "/v1/chat/completions"
    assert received["body"]["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_responses_function_call_round_on_a_chat_only_server(client, streamed):
    question = {"role": "user", "content": "Weather and time in Paris?"}
    first, _ = respond(client, streamed, input=[question], tools=RESPONSE_TOOLS)
    calls = [item for item in first.output if item.type == "function_call"]
    assert [call.name for call in calls] == TOOLS
    for call in calls:
        assert json.loads(call.arguments) == tool_arguments(call.name)
    assert len({call.call_id for call in calls}) == 2

    follow_up = [
        question,
        *({"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls),
        *({"type": "function_call_output", "call_id": c.call_id, "output": TOOL_RESULT} for c in calls),
    ]
    second, _ = respond(client, streamed, input=follow_up, tools=RESPONSE_TOOLS)
    assert second.output_text == f"The tool said: {TOOL_RESULT} {TOOL_RESULT}"


def test_previous_response_id_is_refused_naming_it(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="local", input="and then?", previous_response_id="resp_123")
    assert "previous_response_id" in raised.value.message

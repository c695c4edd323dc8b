"""The official openai Python SDK gets the same objects from a cache miss and from a hit."""

import uuid

import openai
import pytest

from conftest import _start_sidecar, _stop

MODEL = "cached"


@pytest.fixture(scope="module")
def cached_sidecar(tmp_path_factory, fake_upstream):
    tmp = tmp_path_factory.mktemp("cache")
    proc, sidecar = _start_sidecar(
        tmp,
        f"""
endpoints:
  - name: {MODEL}
    provider: openai-compatible
    baseUrl: {fake_upstream.base_url}
    model: cached-upstream-model
    cache: {{ttl: 10m}}
""",
    )
    yield sidecar
    _stop(proc)
    assert proc.returncode == 0, "the sidecar exits 0 on SIGTERM"


@pytest.fixture()
def client(cached_sidecar):
    return openai.OpenAI(base_url=cached_sidecar.base_url, api_key="sk-app-placeholder", max_retries=0)


def prompt():
    """A prompt no other call used, so that its first call misses."""
    return f"cache test {uuid.uuid4()}"


def upstream_calls(fake_upstream, text):
    """Calls the fake received whose body mentions `text`."""
    return sum(1 for r in fake_upstream.requests() if text in str(r["body"]))


def chat(client, text, **extra):
    return client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0, messages=[{"role": "user", "content": text}], **extra
    )


def read_chat_stream(raw):
    """(content, finish_reason, chunk ids, usage) of a streamed chat answer."""
    pieces, finish, ids, usage = [], None, [], None
    for chunk in raw.parse():
        ids.append(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, ids, usage


def test_a_chat_hit_is_the_same_object_as_the_miss(client, fake_upstream):
    text = prompt()
    miss = chat(client, text)
    hit = chat(client, text)
    assert (miss.headers["x-llmesh-cache"], hit.headers["x-llmesh-cache"]) == ("miss", "hit-memory")
    assert hit.parse().model_dump() == miss.parse().model_dump()
    assert upstream_calls(fake_upstream, text) == 1


def test_a_streamed_hit_streams_what_the_streamed_miss_did(client, fake_upstream):
    text = prompt()
    usage = {"include_usage": True}
    miss = chat(client, text, stream=True, stream_options=usage)
    hit = chat(client, text, stream=True, stream_options=usage)
    assert (miss.headers["x-llmesh-cache"], hit.headers["x-llmesh-cache"]) == ("miss", "hit-memory")
    missed, served = read_chat_stream(miss), read_chat_stream(hit)
    assert served[0] == missed[0] and missed[0]
    assert served[1] == missed[1] == "stop"
    assert set(served[2]) == set(missed[2]) and len(set(missed[2])) == 1, "one id for every chunk"
    assert served[3] == missed[3] and missed[3]["prompt_tokens"] == 10
    assert upstream_calls(fake_upstream, text) == 1


def test_a_stream_and_a_json_answer_serve_each_other(client, fake_upstream):
    streamed_first = prompt()
    content, finish, ids, _ = read_chat_stream(chat(client, streamed_first, stream=True))
    as_json = chat(client, streamed_first)
    assert as_json.headers["x-llmesh-cache"] == "hit-memory"
    completion = as_json.parse()
    assert completion.choices[0].message.content == content
    assert completion.choices[0].finish_reason == finish
    assert completion.id == ids[0]

    json_first = prompt()
    completion = chat(client, json_first).parse()
    as_stream = chat(client, json_first, stream=True)
    assert as_stream.headers["x-llmesh-cache"] == "hit-memory"
    content, finish, ids, _ = read_chat_stream(as_stream)
    assert content == completion.choices[0].message.content
    assert finish == completion.choices[0].finish_reason
    assert set(ids) == {completion.id}
    assert upstream_calls(fake_upstream, streamed_first) == upstream_calls(fake_upstream, json_first) == 1


def test_completions_and_embeddings_hit_too(client, fake_upstream):
    text = prompt()
    ask = dict(model=MODEL, prompt=text, temperature=0)
    miss = client.completions.with_raw_response.create(**ask)
    hit = client.completions.with_raw_response.create(**ask)
    assert hit.headers["x-llmesh-cache"] == "hit-memory"
    assert hit.parse().model_dump() == miss.parse().model_dump()
    streamed = client.completions.with_raw_response.create(**ask, stream=True)
    assert streamed.headers["x-llmesh-cache"] == "hit-memory"
    chunks = list(streamed.parse())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == miss.parse().choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"

    vectors = dict(model=MODEL, input=[text, "second"], encoding_format="float")
    miss = client.embeddings.with_raw_response.create(**vectors)
    hit = client.embeddings.with_raw_response.create(**vectors)
    assert (miss.headers["x-llmesh-cache"], hit.headers["x-llmesh-cache"]) == ("miss", "hit-memory")
    assert hit.parse().model_dump() == miss.parse().model_dump()
    assert len(hit.parse().data) == 2
    assert upstream_calls(fake_upstream, text) == 2


def test_no_store_and_sampling_go_to_the_provider(client, fake_upstream):
    text = prompt()
    private = {"x-llmesh-cache": "no-store"}
    for _ in range(2):
        raw = chat(client, text, extra_headers=private)
        assert raw.headers["x-llmesh-cache"] == "bypass"
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0.7, messages=[{"role": "user", "content": text}]
        )
        assert raw.headers["x-llmesh-cache"] == "bypass"
    assert upstream_calls(fake_upstream, text) == 4

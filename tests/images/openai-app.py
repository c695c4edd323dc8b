"""An app that knows nothing of llmesh: the official OpenAI SDK, configured only by the
environment (OPENAI_BASE_URL and OPENAI_API_KEY, which the sidecar injection sets).

Every second it makes one plain and one streamed chat completion for MODEL and prints one JSON
line per answer, `COUNT` times (0, the default, for ever). Exits 1 if the last call failed.

usage: openai-app.py [MODEL] [COUNT]
"""

import json
import sys
import time

from openai import OpenAI


def chat_once(client, model):
    messages = [{"role": "user", "content": "Hello"}]
    completion = client.chat.completions.create(model=model, messages=messages)
    print(json.dumps({
        "ok": True,
        "stream": False,
        "object": completion.object,
        "model": completion.model,
        "total_tokens": completion.usage.total_tokens if completion.usage else None,
    }), flush=True)
    chunks = 0
    content = []
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            content.append(chunk.choices[0].delta.content)
    print(json.dumps({"ok": True, "stream": True, "chunks": chunks, "chars": len("".join(content))}), flush=True)


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "chat"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    client = OpenAI(max_retries=0, timeout=30)
    calls = 0
    failed = False
    while count == 0 or calls < count:
        calls += 1
        try:
            chat_once(client, model)
            failed = False
        except Exception as error:  # the app keeps going, as a real one would; the log says why
            print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}), flush=True)
            failed = True
        if count == 0 or calls < count:
            time.sleep(1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

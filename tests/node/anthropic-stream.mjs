// The official @anthropic-ai/sdk Node client streams a message through the llmesh sidecar,
// configured the way an unchanged app is: ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY.
// Started by tests/python/test_node_sdk.py with LLMESH_MODEL naming the endpoint and
// LLMESH_EXPECT_* giving what the fake upstream answers. Exits non-zero on any mismatch.
import assert from 'node:assert/strict';
import Anthropic from '@anthropic-ai/sdk';

const client = new Anthropic({ maxRetries: 0 });
const deltas = [];
const eventTypes = [];
const stream = client.messages.stream({
  model: process.env.LLMESH_MODEL,
  max_tokens: 256,
  messages: [{ role: 'user', content: 'Hello from Node' }],
});
stream.on('text', (delta) => deltas.push(delta));
stream.on('streamEvent', (event) => eventTypes.push(event.type));
const message = await stream.finalMessage();

assert.deepEqual(deltas, JSON.parse(process.env.LLMESH_EXPECT_DELTAS));
assert.equal(message.content[0].text, deltas.join(''));
assert.equal(message.stop_reason, 'end_turn');
assert.equal(message.model, process.env.LLMESH_EXPECT_MODEL);
assert.equal(message.usage.input_tokens, Number(process.env.LLMESH_EXPECT_INPUT_TOKENS));
assert.equal(message.usage.output_tokens, Number(process.env.LLMESH_EXPECT_OUTPUT_TOKENS));
assert.equal(eventTypes[0], 'message_start');
assert.equal(eventTypes.at(-1), 'message_stop');
console.log(JSON.stringify({ ok: true, events: eventTypes.length, text: message.content[0].text }));

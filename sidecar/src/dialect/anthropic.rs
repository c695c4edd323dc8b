//! Anthropic Messages ⇄ OpenAI Chat Completions, for requests and non-streamed responses.
//!
//! Each request parameter is either translated, dropped because its loss cannot change the
//! answer, or refused with a [`TranslateError`] naming it: an app that relies on a parameter
//! gets a 400 it can read rather than a quietly different answer. A known parameter sent as
//! `null` means "not set" (SDKs send it so) and is treated as absent. Unknown top-level
//! fields are refused.
//!
//! Chat Completions parameters dropped on the way to Anthropic:
//!
//! | parameter                                  | why dropping it is harmless                       |
//! |--------------------------------------------|---------------------------------------------------|
//! | `stream_options`                           | Anthropic's stream always reports usage           |
//! | `seed`                                     | determinism is only best effort at OpenAI too     |
//! | `store`, `metadata`                        | OpenAI-side storage and its tags                  |
//! | `service_tier`                             | OpenAI's billing tier                             |
//! | `prediction`                               | a latency hint; the answer is the same without it |
//! | `parallel_tool_calls: true`                | Anthropic's default                               |
//! | `n: 1`, `logprobs: false`                  | the defaults                                      |
//! | `frequency_penalty`/`presence_penalty: 0`  | the defaults                                      |
//! | `response_format: {"type":"text"}`         | the default                                       |
//! | `modalities: ["text"]`, `logit_bias: {}`   | the defaults                                      |
//! | a message's `name`                         | Anthropic has no participant names                |
//! | an image part's `detail`                   | Anthropic chooses the resolution itself           |
//!
//! Anthropic Messages parameters dropped on the way to OpenAI: `thinking: {"type":"disabled"}`
//! (the default), `service_tier`, and `cache_control` anywhere (prompt caching hints; OpenAI
//! caches on its own). A previous turn's `thinking`/`redacted_thinking` blocks are dropped too:
//! they are signed for Claude and no other model can take them back.

use serde_json::{json, Map, Value};

use super::stop_reason::{to_finish_reason, to_stop_reason};
use super::usage;
use super::TranslateError;

/// The `max_tokens` given to Anthropic for an OpenAI request that sets no limit: Anthropic
/// requires one, OpenAI defaults to the model's maximum. 4096 fits every Claude model and is
/// more than most chat answers use; an app wanting longer answers sets
/// `max_completion_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

type Object = Map<String, Value>;

/// Anthropic's temperature goes from 0 to 1; OpenAI's from 0 to 2, with no agreed mapping.
const TEMPERATURE_RANGE: &str = "Anthropic's temperature range is 0 to 1 (OpenAI's is 0 to 2)";

/// What an OpenAI tool with no `parameters` takes: nothing.
fn empty_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

// ---------------------------------------------------------------------------------------
// Chat Completions request → Messages request
// ---------------------------------------------------------------------------------------

/// An OpenAI Chat Completions request as an Anthropic Messages request.
pub fn chat_request_to_messages(chat: &Value) -> Result<Value, TranslateError> {
    let chat = as_object(chat, "body")?;
    for (key, value) in chat {
        check_chat_field(key, value)?;
    }
    let mut out = Object::new();
    copy_field(chat, &mut out, "model");
    copy_field(chat, &mut out, "stream");
    let turns = chat_messages_to_turns(required(chat, "messages", "messages")?)?;
    if let Some(system) = system_prompt(turns.system) {
        out.insert("system".into(), system);
    }
    out.insert("messages".into(), Value::Array(turns.messages));
    out.insert("max_tokens".into(), json!(chat_max_tokens(chat)?));
    if let Some(stop) = field(chat, "stop") {
        let stop = stop_sequences(stop)?;
        if !stop.is_empty() {
            out.insert("stop_sequences".into(), Value::Array(stop));
        }
    }
    if let Some(temperature) = field(chat, "temperature") {
        out.insert("temperature".into(), anthropic_temperature(temperature)?);
    }
    if let Some(top_p) = field(chat, "top_p") {
        out.insert("top_p".into(), number(top_p, "top_p")?);
    }
    if let Some(user) = field(chat, "user") {
        out.insert("metadata".into(), json!({"user_id": as_str(user, "user")?}));
    }
    let tools = match field(chat, "tools") {
        Some(tools) => chat_tools_to_messages(tools)?,
        None => Vec::new(),
    };
    if let Some(choice) = chat_tool_choice(chat, !tools.is_empty())? {
        out.insert("tool_choice".into(), Value::Object(choice));
    }
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    Ok(Value::Object(out))
}

/// Refuses a top-level Chat Completions field that cannot be translated nor safely dropped.
fn check_chat_field(key: &str, value: &Value) -> Result<(), TranslateError> {
    let why = match key {
        "model"
        | "messages"
        | "stream"
        | "max_tokens"
        | "max_completion_tokens"
        | "stop"
        | "temperature"
        | "top_p"
        | "user"
        | "tools"
        | "tool_choice"
        | "parallel_tool_calls" => return Ok(()),
        "stream_options" | "seed" | "store" | "metadata" | "service_tier" | "prediction" => {
            return Ok(())
        }
        "n" | "logprobs" | "top_logprobs" | "frequency_penalty" | "presence_penalty"
        | "response_format" | "modalities" | "audio" | "logit_bias" | "reasoning_effort"
        | "web_search_options" | "functions" | "function_call"
            if value.is_null() =>
        {
            return Ok(())
        }
        "n" if value.as_u64() == Some(1) => return Ok(()),
        "n" => "Anthropic generates one choice per request",
        "logprobs" if value == &Value::Bool(false) => return Ok(()),
        "logprobs" | "top_logprobs" => "Anthropic does not return log probabilities",
        "frequency_penalty" | "presence_penalty" if value.as_f64() == Some(0.0) => return Ok(()),
        "frequency_penalty" | "presence_penalty" => "Anthropic has no repetition penalties",
        "response_format" if value.get("type").and_then(Value::as_str) == Some("text") => {
            return Ok(())
        }
        "response_format" => {
            "Anthropic has no JSON mode; describe the format in the prompt or use a tool"
        }
        "modalities" if value == &json!(["text"]) => return Ok(()),
        "modalities" | "audio" => "Anthropic models answer in text only",
        "logit_bias" if value.as_object().is_some_and(Map::is_empty) => return Ok(()),
        "logit_bias" => "Anthropic has no logit bias",
        "reasoning_effort" => "Anthropic's extended thinking is set by a token budget instead",
        "web_search_options" => "web search is one of Anthropic's server tools, not a parameter",
        "functions" | "function_call" => "legacy function calling; use tools and tool_choice",
        _ => "unknown parameter (refused rather than silently dropped)",
    };
    Err(unsupported(key, why))
}

fn chat_max_tokens(chat: &Object) -> Result<u64, TranslateError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        if let Some(value) = field(chat, key) {
            return value
                .as_u64()
                .ok_or_else(|| invalid(key, "must be a non-negative integer"));
        }
    }
    Ok(DEFAULT_MAX_TOKENS)
}

/// `stop` is a string or an array of strings; Anthropic always takes an array.
fn stop_sequences(stop: &Value) -> Result<Vec<Value>, TranslateError> {
    match stop {
        Value::String(_) => Ok(vec![stop.clone()]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                as_str(item, &format!("stop[{i}]"))?;
                Ok(item.clone())
            })
            .collect(),
        _ => Err(invalid("stop", "must be a string or an array of strings")),
    }
}

fn anthropic_temperature(temperature: &Value) -> Result<Value, TranslateError> {
    let value = temperature
        .as_f64()
        .ok_or_else(|| invalid("temperature", "must be a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(temperature.clone())
    } else {
        Err(invalid("temperature", TEMPERATURE_RANGE))
    }
}

/// Anthropic's conversation, built message by message from OpenAI's.
#[derive(Default)]
struct Turns {
    system: Vec<String>,
    messages: Vec<Value>,
    /// Results of the previous assistant turn's tool calls, not yet put into a user turn:
    /// Anthropic wants all of them, and any user text after them, in one user message.
    tool_results: Vec<Value>,
}

impl Turns {
    fn push(&mut self, role: &str, content: Value) {
        self.flush_tool_results();
        self.messages
            .push(json!({"role": role, "content": content}));
    }

    fn push_user(&mut self, content: Value) {
        if self.tool_results.is_empty() {
            self.push("user", content);
            return;
        }
        let mut blocks = std::mem::take(&mut self.tool_results);
        match content {
            Value::String(text) if text.is_empty() => {}
            Value::String(text) => blocks.push(text_block(text)),
            Value::Array(parts) => blocks.extend(parts),
            _ => {}
        }
        self.messages
            .push(json!({"role": "user", "content": blocks}));
    }

    fn push_assistant(&mut self, blocks: Vec<Value>) {
        // A turn with neither text nor tool calls carries nothing, and Anthropic refuses
        // empty text blocks.
        if blocks.is_empty() {
            self.flush_tool_results();
        } else {
            self.push("assistant", Value::Array(blocks));
        }
    }

    fn flush_tool_results(&mut self) {
        if !self.tool_results.is_empty() {
            let blocks = std::mem::take(&mut self.tool_results);
            self.messages
                .push(json!({"role": "user", "content": blocks}));
        }
    }
}

fn chat_messages_to_turns(messages: &Value) -> Result<Turns, TranslateError> {
    let mut turns = Turns::default();
    for (i, message) in as_array(messages, "messages")?.iter().enumerate() {
        let path = format!("messages[{i}]");
        let message = as_object(message, &path)?;
        let role_path = format!("{path}.role");
        match as_str(required(message, "role", &role_path)?, &role_path)? {
            "system" | "developer" => turns.system.extend(system_texts(message, &path)?),
            "user" => turns.push_user(user_content(message, &path)?),
            "assistant" => turns.push_assistant(assistant_blocks(message, &path)?),
            "tool" => turns.tool_results.push(tool_result_block(message, &path)?),
            "function" => {
                return Err(unsupported(
                    role_path,
                    "legacy function messages; use tool messages",
                ))
            }
            role => return Err(invalid(role_path, format!("unknown role '{role}'"))),
        }
    }
    turns.flush_tool_results();
    Ok(turns)
}

/// Anthropic's `system`: a string for one prompt, else text blocks in order.
fn system_prompt(mut texts: Vec<String>) -> Option<Value> {
    match texts.len() {
        0 => None,
        1 => texts.pop().map(Value::String),
        _ => Some(Value::Array(texts.into_iter().map(text_block).collect())),
    }
}

fn system_texts(message: &Object, path: &str) -> Result<Vec<String>, TranslateError> {
    let content_path = format!("{path}.content");
    match required(message, "content", &content_path)? {
        Value::String(text) => Ok(vec![text.clone()]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| {
                let part_path = format!("{content_path}[{j}]");
                match part_type(part, &part_path)? {
                    ("text", part) => Ok(text_of(part, &part_path)?.to_string()),
                    _ => Err(unsupported(
                        format!("{part_path}.type"),
                        "system prompts can only hold text",
                    )),
                }
            })
            .collect(),
        _ => Err(invalid(
            content_path,
            "must be a string or an array of parts",
        )),
    }
}

fn user_content(message: &Object, path: &str) -> Result<Value, TranslateError> {
    let content_path = format!("{path}.content");
    match required(message, "content", &content_path)? {
        Value::String(text) => Ok(Value::String(text.clone())),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| user_part(part, &format!("{content_path}[{j}]")))
            .collect(),
        _ => Err(invalid(
            content_path,
            "must be a string or an array of parts",
        )),
    }
}

fn user_part(part: &Value, path: &str) -> Result<Value, TranslateError> {
    match part_type(part, path)? {
        ("text", part) => Ok(text_block(text_of(part, path)?.to_string())),
        ("image_url", part) => {
            let image_path = format!("{path}.image_url");
            let image = as_object(required(part, "image_url", &image_path)?, &image_path)?;
            let url_path = format!("{image_path}.url");
            let url = as_str(required(image, "url", &url_path)?, &url_path)?;
            Ok(json!({"type": "image", "source": image_source(url, &url_path)?}))
        }
        _ => Err(unsupported(
            format!("{path}.type"),
            "Anthropic takes only text and image parts here",
        )),
    }
}

/// An image URL as Anthropic's image `source`: a `data:` URL carries the image itself.
fn image_source(url: &str, path: &str) -> Result<Value, TranslateError> {
    if let Some(data_url) = url.strip_prefix("data:") {
        let (media_type, data) = data_url
            .split_once(";base64,")
            .ok_or_else(|| unsupported(path, "only base64 data URLs can be sent to Anthropic"))?;
        return Ok(json!({"type": "base64", "media_type": media_type, "data": data}));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "url", "url": url}));
    }
    Err(invalid(path, "must be an http(s) URL or a data URL"))
}

fn assistant_blocks(message: &Object, path: &str) -> Result<Vec<Value>, TranslateError> {
    for (key, why) in [
        ("function_call", "legacy function calling; use tool_calls"),
        ("audio", "Anthropic cannot be given an earlier audio answer"),
    ] {
        if field(message, key).is_some() {
            return Err(unsupported(format!("{path}.{key}"), why));
        }
    }
    let mut blocks = Vec::new();
    let content_path = format!("{path}.content");
    match field(message, "content") {
        None => {}
        Some(Value::String(text)) => push_text(&mut blocks, text),
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let part_path = format!("{content_path}[{j}]");
                let text = match part_type(part, &part_path)? {
                    ("text", part) => text_of(part, &part_path)?,
                    ("refusal", part) => {
                        let refusal_path = format!("{part_path}.refusal");
                        as_str(required(part, "refusal", &refusal_path)?, &refusal_path)?
                    }
                    _ => {
                        return Err(unsupported(
                            format!("{part_path}.type"),
                            "assistant messages can only hold text",
                        ))
                    }
                };
                push_text(&mut blocks, text);
            }
        }
        Some(_) => {
            return Err(invalid(
                content_path,
                "must be a string, an array of parts or null",
            ))
        }
    }
    if let Some(refusal) = field(message, "refusal") {
        push_text(&mut blocks, as_str(refusal, &format!("{path}.refusal"))?);
    }
    if let Some(calls) = field(message, "tool_calls") {
        let calls_path = format!("{path}.tool_calls");
        for (k, call) in as_array(calls, &calls_path)?.iter().enumerate() {
            blocks.push(tool_use_block(call, &format!("{calls_path}[{k}]"))?);
        }
    }
    Ok(blocks)
}

/// Anthropic refuses empty text blocks.
fn push_text(blocks: &mut Vec<Value>, text: &str) {
    if !text.is_empty() {
        blocks.push(text_block(text.to_string()));
    }
}

fn tool_use_block(call: &Value, path: &str) -> Result<Value, TranslateError> {
    let call = as_object(call, path)?;
    if let Some(kind) = field(call, "type") {
        let type_path = format!("{path}.type");
        if as_str(kind, &type_path)? != "function" {
            return Err(unsupported(
                type_path,
                "only function tool calls can be sent",
            ));
        }
    }
    let id_path = format!("{path}.id");
    let id = as_str(required(call, "id", &id_path)?, &id_path)?;
    let function_path = format!("{path}.function");
    let function = as_object(required(call, "function", &function_path)?, &function_path)?;
    let name_path = format!("{function_path}.name");
    let name = as_str(required(function, "name", &name_path)?, &name_path)?;
    let arguments_path = format!("{function_path}.arguments");
    let arguments = match field(function, "arguments") {
        Some(arguments) => as_str(arguments, &arguments_path)?,
        None => "",
    };
    let input = parse_arguments(arguments)
        .ok_or_else(|| invalid(arguments_path, "must be a JSON object"))?;
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

/// A tool call's `arguments` as the object Anthropic wants. Models calling a tool that
/// takes nothing sometimes send an empty string: that is no arguments, not an error.
fn parse_arguments(arguments: &str) -> Option<Value> {
    if arguments.trim().is_empty() {
        return Some(json!({}));
    }
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
}

fn tool_result_block(message: &Object, path: &str) -> Result<Value, TranslateError> {
    let id_path = format!("{path}.tool_call_id");
    let id = as_str(required(message, "tool_call_id", &id_path)?, &id_path)?;
    let content_path = format!("{path}.content");
    let content = match field(message, "content") {
        None => Value::String(String::new()),
        Some(Value::String(text)) => Value::String(text.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| {
                let part_path = format!("{content_path}[{j}]");
                match part_type(part, &part_path)? {
                    ("text", part) => Ok(text_block(text_of(part, &part_path)?.to_string())),
                    _ => Err(unsupported(
                        format!("{part_path}.type"),
                        "tool messages can only hold text",
                    )),
                }
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(invalid(
                content_path,
                "must be a string or an array of parts",
            ))
        }
    };
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

fn chat_tools_to_messages(tools: &Value) -> Result<Vec<Value>, TranslateError> {
    as_array(tools, "tools")?
        .iter()
        .enumerate()
        .map(|(i, tool)| chat_tool(tool, &format!("tools[{i}]")))
        .collect()
}

fn chat_tool(tool: &Value, path: &str) -> Result<Value, TranslateError> {
    let tool = as_object(tool, path)?;
    let type_path = format!("{path}.type");
    if as_str(required(tool, "type", &type_path)?, &type_path)? != "function" {
        return Err(unsupported(
            type_path,
            "only function tools can be sent to Anthropic",
        ));
    }
    let function_path = format!("{path}.function");
    let function = as_object(required(tool, "function", &function_path)?, &function_path)?;
    let name_path = format!("{function_path}.name");
    let mut out = Object::new();
    out.insert(
        "name".into(),
        json!(as_str(required(function, "name", &name_path)?, &name_path)?),
    );
    if let Some(description) = field(function, "description") {
        out.insert("description".into(), description.clone());
    }
    let schema = field(function, "parameters")
        .cloned()
        .unwrap_or_else(empty_schema);
    out.insert("input_schema".into(), schema);
    Ok(Value::Object(out))
}

/// `tool_choice`, with `parallel_tool_calls: false` folded in (Anthropic keeps it there).
fn chat_tool_choice(chat: &Object, has_tools: bool) -> Result<Option<Object>, TranslateError> {
    let mut choice = match field(chat, "tool_choice") {
        None => None,
        Some(Value::String(mode)) => Some(match mode.as_str() {
            "auto" => json_object("auto"),
            "none" => json_object("none"),
            "required" => json_object("any"),
            _ => {
                return Err(invalid(
                    "tool_choice",
                    "must be \"auto\", \"none\", \"required\" or a function",
                ))
            }
        }),
        Some(Value::Object(named)) => Some(named_tool_choice(named)?),
        Some(_) => return Err(invalid("tool_choice", "must be a string or an object")),
    };
    let parallel = match field(chat, "parallel_tool_calls") {
        None => true,
        Some(value) => value
            .as_bool()
            .ok_or_else(|| invalid("parallel_tool_calls", "must be a boolean"))?,
    };
    if !parallel && has_tools {
        let choice = choice.get_or_insert_with(|| json_object("auto"));
        // Anthropic's `none` has no such flag: no calls at all are made.
        if choice.get("type").and_then(Value::as_str) != Some("none") {
            choice.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    Ok(choice)
}

fn named_tool_choice(named: &Object) -> Result<Object, TranslateError> {
    let kind = as_str(
        required(named, "type", "tool_choice.type")?,
        "tool_choice.type",
    )?;
    if kind != "function" {
        return Err(unsupported(
            "tool_choice.type",
            "only a function can be chosen for Anthropic",
        ));
    }
    let function = as_object(
        required(named, "function", "tool_choice.function")?,
        "tool_choice.function",
    )?;
    let name_path = "tool_choice.function.name";
    let name = as_str(required(function, "name", name_path)?, name_path)?;
    let mut choice = json_object("tool");
    choice.insert("name".into(), json!(name));
    Ok(choice)
}

fn json_object(kind: &str) -> Object {
    let mut object = Object::new();
    object.insert("type".into(), json!(kind));
    object
}

// ---------------------------------------------------------------------------------------
// Messages request → Chat Completions request
// ---------------------------------------------------------------------------------------

/// An Anthropic Messages request as an OpenAI Chat Completions request.
pub fn messages_request_to_chat(messages: &Value) -> Result<Value, TranslateError> {
    let request = as_object(messages, "body")?;
    for (key, value) in request {
        check_messages_field(key, value)?;
    }
    let mut out = Object::new();
    copy_field(request, &mut out, "model");
    copy_field(request, &mut out, "stream");
    if request.get("stream") == Some(&Value::Bool(true)) {
        // Anthropic's stream always ends with usage; OpenAI's only when asked.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let mut chat_messages = Vec::new();
    if let Some(system) = field(request, "system") {
        chat_messages.push(json!({"role": "system", "content": system_text(system)?}));
    }
    let turns = as_array(required(request, "messages", "messages")?, "messages")?;
    for (i, message) in turns.iter().enumerate() {
        anthropic_message_to_chat(message, &format!("messages[{i}]"), &mut chat_messages)?;
    }
    out.insert("messages".into(), Value::Array(chat_messages));
    if let Some(max_tokens) = field(request, "max_tokens") {
        let max_tokens = max_tokens
            .as_u64()
            .ok_or_else(|| invalid("max_tokens", "must be a non-negative integer"))?;
        out.insert("max_tokens".into(), json!(max_tokens));
    }
    if let Some(stop) = field(request, "stop_sequences") {
        let stop = string_array(stop, "stop_sequences")?;
        if !stop.is_empty() {
            out.insert("stop".into(), Value::Array(stop));
        }
    }
    for key in ["temperature", "top_p"] {
        if let Some(value) = field(request, key) {
            out.insert(key.into(), number(value, key)?);
        }
    }
    if let Some(metadata) = field(request, "metadata") {
        let metadata = as_object(metadata, "metadata")?;
        if let Some(user) = field(metadata, "user_id") {
            out.insert("user".into(), json!(as_str(user, "metadata.user_id")?));
        }
    }
    let tools = match field(request, "tools") {
        Some(tools) => messages_tools_to_chat(tools)?,
        None => Vec::new(),
    };
    if let Some(choice) = field(request, "tool_choice") {
        messages_tool_choice(choice, !tools.is_empty(), &mut out)?;
    }
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    Ok(Value::Object(out))
}

/// Refuses a top-level Messages field that cannot be translated nor safely dropped.
fn check_messages_field(key: &str, value: &Value) -> Result<(), TranslateError> {
    let why = match key {
        "model" | "messages" | "system" | "max_tokens" | "stop_sequences" | "stream"
        | "temperature" | "top_p" | "metadata" | "tools" | "tool_choice" => return Ok(()),
        "service_tier" | "cache_control" => return Ok(()),
        "top_k" | "thinking" | "container" | "mcp_servers" if value.is_null() => return Ok(()),
        "thinking" if value.get("type").and_then(Value::as_str) == Some("disabled") => {
            return Ok(())
        }
        "thinking" => "extended thinking has no Chat Completions equivalent",
        "top_k" => "OpenAI's API has no top_k sampling",
        "container" => "containers belong to Anthropic's code execution tool",
        "mcp_servers" => "MCP servers are called by Anthropic's API itself",
        _ => "unknown parameter (refused rather than silently dropped)",
    };
    Err(unsupported(key, why))
}

/// Anthropic's `system` (a string or text blocks) as one system message's text.
fn system_text(system: &Value) -> Result<String, TranslateError> {
    match system {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let texts = blocks
                .iter()
                .enumerate()
                .map(|(j, block)| {
                    let path = format!("system[{j}]");
                    match part_type(block, &path)? {
                        ("text", block) => text_of(block, &path),
                        _ => Err(unsupported(
                            format!("{path}.type"),
                            "system prompts can only hold text",
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(texts.join("\n"))
        }
        _ => Err(invalid(
            "system",
            "must be a string or an array of text blocks",
        )),
    }
}

fn anthropic_message_to_chat(
    message: &Value,
    path: &str,
    out: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    let message = as_object(message, path)?;
    let role_path = format!("{path}.role");
    let role = as_str(required(message, "role", &role_path)?, &role_path)?;
    if role != "user" && role != "assistant" {
        return Err(invalid(role_path, format!("unknown role '{role}'")));
    }
    let content_path = format!("{path}.content");
    match required(message, "content", &content_path)? {
        Value::String(text) => out.push(json!({"role": role, "content": text})),
        Value::Array(blocks) if role == "user" => user_blocks_to_chat(blocks, &content_path, out)?,
        Value::Array(blocks) => out.push(assistant_blocks_to_chat(blocks, &content_path)?),
        _ => {
            return Err(invalid(
                content_path,
                "must be a string or an array of content blocks",
            ))
        }
    }
    Ok(())
}

/// A user turn: its tool results become `tool` messages, which OpenAI wants right after the
/// assistant's calls, so they come before the user's own text and images.
fn user_blocks_to_chat(
    blocks: &[Value],
    path: &str,
    out: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    let mut parts = Vec::new();
    let mut tool_messages = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let block_path = format!("{path}[{j}]");
        match part_type(block, &block_path)? {
            ("text", block) => {
                parts.push(json!({"type": "text", "text": text_of(block, &block_path)?}))
            }
            ("image", block) => parts.push(image_part(block, &block_path)?),
            ("tool_result", block) => tool_messages.push(tool_message(block, &block_path)?),
            _ => {
                return Err(unsupported(
                    format!("{block_path}.type"),
                    "Chat Completions takes only text, images and tool results from the user",
                ))
            }
        }
    }
    let only_tool_results = parts.is_empty() && !tool_messages.is_empty();
    out.extend(tool_messages);
    if only_tool_results {
        return Ok(());
    }
    let content = match parts.as_slice() {
        [single] if single.get("type") == Some(&json!("text")) => {
            single.get("text").cloned().unwrap_or_default()
        }
        _ => Value::Array(parts),
    };
    out.push(json!({"role": "user", "content": content}));
    Ok(())
}

fn image_part(block: &Object, path: &str) -> Result<Value, TranslateError> {
    let source_path = format!("{path}.source");
    let source = as_object(required(block, "source", &source_path)?, &source_path)?;
    let field_str = |key: &str| -> Result<&str, TranslateError> {
        let key_path = format!("{source_path}.{key}");
        as_str(required(source, key, &key_path)?, &key_path)
    };
    let url = match field_str("type")? {
        "base64" => format!(
            "data:{};base64,{}",
            field_str("media_type")?,
            field_str("data")?
        ),
        "url" => field_str("url")?.to_string(),
        _ => {
            return Err(unsupported(
                format!("{source_path}.type"),
                "only base64 and URL images can be sent",
            ))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// A `tool_result` block as a `tool` message. OpenAI has no error flag on tool results, so
/// an error is said in the text, which is how the model would read it anyway.
fn tool_message(block: &Object, path: &str) -> Result<Value, TranslateError> {
    let id_path = format!("{path}.tool_use_id");
    let id = as_str(required(block, "tool_use_id", &id_path)?, &id_path)?;
    let content_path = format!("{path}.content");
    let mut text = match field(block, "content") {
        None => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .enumerate()
            .map(|(k, inner)| {
                let inner_path = format!("{content_path}[{k}]");
                match part_type(inner, &inner_path)? {
                    ("text", inner) => text_of(inner, &inner_path),
                    _ => Err(unsupported(
                        format!("{inner_path}.type"),
                        "Chat Completions tool messages can only hold text",
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?
            .join("\n"),
        Some(_) => {
            return Err(invalid(
                content_path,
                "must be a string or an array of content blocks",
            ))
        }
    };
    if field(block, "is_error") == Some(&Value::Bool(true)) {
        text.insert_str(0, "Error: ");
    }
    Ok(json!({"role": "tool", "tool_call_id": id, "content": text}))
}

fn assistant_blocks_to_chat(blocks: &[Value], path: &str) -> Result<Value, TranslateError> {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let block_path = format!("{path}[{j}]");
        match part_type(block, &block_path)? {
            ("text", block) => text.push_str(text_of(block, &block_path)?),
            ("tool_use", block) => tool_calls.push(
                tool_call(block)
                    .ok_or_else(|| invalid(block_path, "a tool_use needs a string id and name"))?,
            ),
            ("thinking" | "redacted_thinking", _) => {}
            _ => {
                return Err(unsupported(
                    format!("{block_path}.type"),
                    "Chat Completions takes only text and tool calls from the assistant",
                ))
            }
        }
    }
    Ok(chat_assistant_message(text, tool_calls))
}

/// An assistant message; `content` is null only when tool calls carry the turn.
fn chat_assistant_message(text: String, tool_calls: Vec<Value>) -> Value {
    let mut message = Object::new();
    message.insert("role".into(), json!("assistant"));
    let content = if text.is_empty() && !tool_calls.is_empty() {
        Value::Null
    } else {
        Value::String(text)
    };
    message.insert("content".into(), content);
    if !tool_calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    Value::Object(message)
}

/// A `tool_use` block as an OpenAI tool call; None when its id or name is missing.
fn tool_call(block: &Object) -> Option<Value> {
    let id = block.get("id")?.as_str()?;
    let name = block.get("name")?.as_str()?;
    let arguments = field(block, "input").map_or_else(|| "{}".to_string(), Value::to_string);
    Some(json!({
        "id": id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }))
}

fn messages_tools_to_chat(tools: &Value) -> Result<Vec<Value>, TranslateError> {
    as_array(tools, "tools")?
        .iter()
        .enumerate()
        .map(|(i, tool)| messages_tool(tool, &format!("tools[{i}]")))
        .collect()
}

fn messages_tool(tool: &Value, path: &str) -> Result<Value, TranslateError> {
    let tool = as_object(tool, path)?;
    if let Some(kind) = field(tool, "type") {
        let type_path = format!("{path}.type");
        if as_str(kind, &type_path)? != "custom" {
            return Err(unsupported(
                type_path,
                "Anthropic's server tools run at Anthropic; Chat Completions has no equivalent",
            ));
        }
    }
    let name_path = format!("{path}.name");
    let mut function = Object::new();
    function.insert(
        "name".into(),
        json!(as_str(required(tool, "name", &name_path)?, &name_path)?),
    );
    if let Some(description) = field(tool, "description") {
        function.insert("description".into(), description.clone());
    }
    let schema = field(tool, "input_schema")
        .cloned()
        .unwrap_or_else(empty_schema);
    function.insert("parameters".into(), schema);
    Ok(json!({"type": "function", "function": function}))
}

fn messages_tool_choice(
    choice: &Value,
    has_tools: bool,
    out: &mut Object,
) -> Result<(), TranslateError> {
    let choice = as_object(choice, "tool_choice")?;
    let chat_choice = match as_str(
        required(choice, "type", "tool_choice.type")?,
        "tool_choice.type",
    )? {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => {
            let name = as_str(
                required(choice, "name", "tool_choice.name")?,
                "tool_choice.name",
            )?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(invalid(
                "tool_choice.type",
                "must be \"auto\", \"any\", \"tool\" or \"none\"",
            ))
        }
    };
    out.insert("tool_choice".into(), chat_choice);
    // OpenAI refuses `parallel_tool_calls` in a request without tools.
    if has_tools && field(choice, "disable_parallel_tool_use") == Some(&Value::Bool(true)) {
        out.insert("parallel_tool_calls".into(), Value::Bool(false));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------

/// An Anthropic message (non-streamed response) as an OpenAI chat completion. `created` is
/// the unix time to put in the chat completion (keeps the function pure).
pub fn messages_response_to_chat(response: &Value, created: u64) -> Result<Value, TranslateError> {
    let response = response
        .as_object()
        .ok_or_else(|| upstream("the message is not a JSON object"))?;
    let id = response
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| upstream("the message has no id"))?;
    let blocks = response
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| upstream("the message has no content array"))?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in blocks {
        let block = block
            .as_object()
            .ok_or_else(|| upstream("a content block is not an object"))?;
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(
                block
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| upstream("a text block has no text"))?,
            ),
            Some("tool_use") => tool_calls.push(
                tool_call(block).ok_or_else(|| upstream("a tool_use block has no id or name"))?,
            ),
            // Thinking, and server tool blocks a request could not have asked for.
            Some(_) => {}
            None => return Err(upstream("a content block has no type")),
        }
    }
    let mut message = Object::new();
    message.insert("role".into(), json!("assistant"));
    let content = if text.is_empty() {
        Value::Null
    } else {
        Value::String(text)
    };
    message.insert("content".into(), content);
    message.insert("refusal".into(), Value::Null);
    if !tool_calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    let stop_reason = response
        .get("stop_reason")
        .and_then(Value::as_str)
        .unwrap_or("end_turn");
    Ok(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": response.get("model").cloned().unwrap_or_default(),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": to_finish_reason(stop_reason),
        }],
        "usage": usage::to_openai(response.get("usage").unwrap_or(&Value::Null)),
    }))
}

/// An OpenAI chat completion (non-streamed) as an Anthropic message.
pub fn chat_response_to_messages(response: &Value) -> Result<Value, TranslateError> {
    let response = response
        .as_object()
        .ok_or_else(|| upstream("the chat completion is not a JSON object"))?;
    let id = response
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| upstream("the chat completion has no id"))?;
    let id = if id.starts_with("msg_") {
        id.to_string()
    } else {
        format!("msg_{id}")
    };
    let choice = response
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|choices| choices.first())
        .and_then(Value::as_object)
        .ok_or_else(|| upstream("the chat completion has no choice"))?;
    let message = choice
        .get("message")
        .and_then(Value::as_object)
        .ok_or_else(|| upstream("the choice has no message"))?;
    let finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("stop");
    Ok(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": response.get("model").cloned().unwrap_or_default(),
        "content": response_blocks(message)?,
        "stop_reason": to_stop_reason(finish_reason),
        "stop_sequence": null,
        "usage": usage::to_anthropic(response.get("usage").unwrap_or(&Value::Null)),
    }))
}

/// The answer's text (or, failing that, its refusal) and tool calls as content blocks.
fn response_blocks(message: &Object) -> Result<Vec<Value>, TranslateError> {
    let mut text = match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        // Some OpenAI-compatible servers answer with parts.
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    };
    if text.is_empty() {
        if let Some(refusal) = message.get("refusal").and_then(Value::as_str) {
            text = refusal.to_string();
        }
    }
    let mut blocks = Vec::new();
    push_text(&mut blocks, &text);
    let calls = match message.get("tool_calls") {
        Some(Value::Array(calls)) => calls.as_slice(),
        None | Some(Value::Null) => &[],
        Some(_) => return Err(upstream("tool_calls is not an array")),
    };
    for call in calls {
        blocks.push(response_tool_use(call)?);
    }
    Ok(blocks)
}

fn response_tool_use(call: &Value) -> Result<Value, TranslateError> {
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| upstream("a tool call has no id"))?;
    let function = call
        .get("function")
        .ok_or_else(|| upstream("a tool call has no function"))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| upstream("a tool call has no name"))?;
    let arguments = function
        .get("arguments")
        .and_then(Value::as_str)
        .unwrap_or("");
    let input = parse_arguments(arguments)
        .ok_or_else(|| upstream("a tool call's arguments are not a JSON object"))?;
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// A field; None when absent or null, as SDKs send null for "not set".
fn field<'a>(object: &'a Object, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|value| !value.is_null())
}

fn required<'a>(object: &'a Object, key: &str, path: &str) -> Result<&'a Value, TranslateError> {
    field(object, key).ok_or_else(|| invalid(path, "is required"))
}

fn copy_field(from: &Object, to: &mut Object, key: &str) {
    if let Some(value) = from.get(key) {
        to.insert(key.into(), value.clone());
    }
}

fn as_object<'a>(value: &'a Value, path: &str) -> Result<&'a Object, TranslateError> {
    value
        .as_object()
        .ok_or_else(|| invalid(path, "must be an object"))
}

fn as_array<'a>(value: &'a Value, path: &str) -> Result<&'a Vec<Value>, TranslateError> {
    value
        .as_array()
        .ok_or_else(|| invalid(path, "must be an array"))
}

fn as_str<'a>(value: &'a Value, path: &str) -> Result<&'a str, TranslateError> {
    value
        .as_str()
        .ok_or_else(|| invalid(path, "must be a string"))
}

fn number(value: &Value, path: &str) -> Result<Value, TranslateError> {
    if value.is_number() {
        Ok(value.clone())
    } else {
        Err(invalid(path, "must be a number"))
    }
}

fn string_array(value: &Value, path: &str) -> Result<Vec<Value>, TranslateError> {
    as_array(value, path)?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            as_str(item, &format!("{path}[{i}]"))?;
            Ok(item.clone())
        })
        .collect()
}

/// A content part or block and its `type`.
fn part_type<'a>(part: &'a Value, path: &str) -> Result<(&'a str, &'a Object), TranslateError> {
    let part = as_object(part, path)?;
    let type_path = format!("{path}.type");
    Ok((
        as_str(required(part, "type", &type_path)?, &type_path)?,
        part,
    ))
}

fn text_of<'a>(part: &'a Object, path: &str) -> Result<&'a str, TranslateError> {
    let text_path = format!("{path}.text");
    as_str(required(part, "text", &text_path)?, &text_path)
}

fn text_block(text: String) -> Value {
    json!({"type": "text", "text": text})
}

fn invalid(param: impl Into<String>, why: impl Into<String>) -> TranslateError {
    TranslateError::Invalid {
        param: param.into(),
        why: why.into(),
    }
}

fn unsupported(param: impl Into<String>, why: &'static str) -> TranslateError {
    TranslateError::Unsupported {
        param: param.into(),
        why,
    }
}

fn upstream(why: &str) -> TranslateError {
    TranslateError::Upstream(why.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: u64 = 1_700_000_000;

    /// Runs a fixture: `{"input", "expected"}`, or an array of them.
    fn golden(fixture: &str, translate: impl Fn(&Value) -> Result<Value, TranslateError>) {
        let fixture: Value = serde_json::from_str(fixture).unwrap();
        let cases = match fixture {
            Value::Array(cases) => cases,
            case => vec![case],
        };
        for case in cases {
            let output =
                translate(&case["input"]).unwrap_or_else(|e| panic!("{e}: {}", case["input"]));
            assert_eq!(output, case["expected"], "input: {}", case["input"]);
        }
    }

    macro_rules! golden_tests {
        ($dir:literal, $translate:expr, $($name:ident),+ $(,)?) => {$(
            #[test]
            fn $name() {
                golden(
                    include_str!(concat!("fixtures/anthropic/", $dir, "/", stringify!($name), ".json")),
                    $translate,
                );
            }
        )+};
    }

    mod chat_to_messages {
        use super::*;
        golden_tests!(
            "chat_to_messages",
            chat_request_to_messages,
            system_prompts,
            multi_turn,
            images,
            tools,
            tool_calls_parallel,
            tool_choice,
            stop_sequences,
            max_tokens,
            sampling,
            harmless_dropped,
        );
    }

    mod messages_to_chat {
        use super::*;
        golden_tests!(
            "messages_to_chat",
            messages_request_to_chat,
            system_prompts,
            multi_turn,
            images,
            tools,
            tool_results,
            tool_choice,
            sampling_and_stop,
            stream,
        );
    }

    mod messages_response_to_chat {
        use super::*;
        golden_tests!(
            "messages_response_to_chat",
            |response: &Value| super::super::messages_response_to_chat(response, CREATED),
            text,
            tool_use,
            usage_with_cache,
            stop_reasons,
        );
    }

    mod chat_response_to_messages {
        use super::*;
        golden_tests!(
            "chat_response_to_messages",
            super::super::chat_response_to_messages,
            text,
            tool_calls,
            usage_with_cache,
            finish_reasons,
        );
    }

    /// The error for `request` with `extra` merged into its top level.
    fn error_with(
        translate: fn(&Value) -> Result<Value, TranslateError>,
        mut request: Value,
        extra: Value,
    ) -> TranslateError {
        if let (Some(request), Some(extra)) = (request.as_object_mut(), extra.as_object()) {
            request.extend(extra.clone());
        }
        translate(&request).expect_err("should be refused")
    }

    fn chat_error(extra: Value) -> TranslateError {
        let request = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        error_with(chat_request_to_messages, request, extra)
    }

    fn messages_error(extra: Value) -> TranslateError {
        let request = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
        error_with(messages_request_to_chat, request, extra)
    }

    fn assert_unsupported(error: TranslateError, param: &str) {
        assert!(
            matches!(&error, TranslateError::Unsupported { param: p, .. } if p == param),
            "{error:?} should refuse {param}"
        );
    }

    fn assert_invalid(error: TranslateError, param: &str) {
        assert!(
            matches!(&error, TranslateError::Invalid { param: p, .. } if p == param),
            "{error:?} should name {param} as invalid"
        );
    }

    macro_rules! refused {
        ($check:ident, $errors:ident: $($name:ident: $extra:tt => $param:literal),+ $(,)?) => {$(
            #[test]
            fn $name() {
                $check($errors(json!($extra)), $param);
            }
        )+};
    }

    refused!(assert_unsupported, chat_error:
        chat_refuses_n_above_one: {"n": 2} => "n",
        chat_refuses_logprobs: {"logprobs": true} => "logprobs",
        chat_refuses_top_logprobs: {"top_logprobs": 3} => "top_logprobs",
        chat_refuses_frequency_penalty: {"frequency_penalty": 0.5} => "frequency_penalty",
        chat_refuses_presence_penalty: {"presence_penalty": -1} => "presence_penalty",
        chat_refuses_json_object: {"response_format": {"type": "json_object"}} => "response_format",
        chat_refuses_json_schema: {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}} => "response_format",
        chat_refuses_audio: {"audio": {"voice": "alloy", "format": "wav"}} => "audio",
        chat_refuses_audio_modality: {"modalities": ["text", "audio"]} => "modalities",
        chat_refuses_logit_bias: {"logit_bias": {"50256": -100}} => "logit_bias",
        chat_refuses_reasoning_effort: {"reasoning_effort": "high"} => "reasoning_effort",
        chat_refuses_web_search_options: {"web_search_options": {}} => "web_search_options",
        chat_refuses_functions: {"functions": [{"name": "f"}]} => "functions",
        chat_refuses_function_call: {"function_call": "auto"} => "function_call",
        chat_refuses_unknown_fields: {"frobnicate": null} => "frobnicate",
        chat_refuses_audio_parts: {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]} => "messages[0].content[1].type",
        chat_refuses_file_parts: {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]} => "messages[2].content[0].type",
        chat_refuses_function_messages: {"messages": [{"role": "function", "name": "f", "content": "x"}]} => "messages[0].role",
        chat_refuses_custom_tools: {"tools": [{"type": "custom", "custom": {"name": "x"}}]} => "tools[0].type",
        chat_refuses_non_base64_data_urls: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]} => "messages[0].content[0].image_url.url",
    );

    refused!(assert_invalid, chat_error:
        chat_refuses_temperature_above_one: {"temperature": 1.5} => "temperature",
        chat_refuses_arguments_that_are_no_object: {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]} => "messages[0].tool_calls[0].function.arguments",
        chat_refuses_unknown_roles: {"messages": [{"role": "robot", "content": "x"}]} => "messages[0].role",
        chat_requires_messages: {"messages": null} => "messages",
    );

    refused!(assert_unsupported, messages_error:
        messages_refuses_top_k: {"top_k": 5} => "top_k",
        messages_refuses_thinking: {"thinking": {"type": "enabled", "budget_tokens": 2048}} => "thinking",
        messages_refuses_container: {"container": "c"} => "container",
        messages_refuses_mcp_servers: {"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]} => "mcp_servers",
        messages_refuses_unknown_fields: {"context_management": {}} => "context_management",
        messages_refuses_server_tools: {"tools": [{"name": "f", "input_schema": {}}, {"type": "web_search_20250305", "name": "web_search"}]} => "tools[1].type",
        messages_refuses_documents: {"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]} => "messages[0].content[0].type",
        messages_refuses_images_in_tool_results: {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]}]} => "messages[0].content[0].content[0].type",
        messages_refuses_file_images: {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]} => "messages[0].content[0].source.type",
        messages_refuses_server_tool_blocks: {"messages": [{"role": "assistant", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]}]} => "messages[0].content[0].type",
    );

    #[test]
    fn upstream_shapes_that_cannot_be_translated_are_upstream_errors() {
        let bad_arguments = json!({"id": "c", "model": "m", "choices": [{"message": {"tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}}]});
        for response in [bad_arguments, json!({"id": "c", "choices": []}), json!([])] {
            let error = chat_response_to_messages(&response).unwrap_err();
            assert!(matches!(error, TranslateError::Upstream(_)), "{error:?}");
        }
        for response in [
            json!({"id": "m", "content": "text"}),
            json!({"content": []}),
            json!(null),
        ] {
            let error = messages_response_to_chat(&response, CREATED).unwrap_err();
            assert!(matches!(error, TranslateError::Upstream(_)), "{error:?}");
        }
    }

    #[test]
    fn chat_round_trips_through_messages() {
        let tools = json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
        ]);
        let conversations = [
            json!([{"role": "user", "content": "hi"}]),
            json!([
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                {"role": "tool", "tool_call_id": "c2", "content": "4C"},
                {"role": "user", "content": "Which is warmer?"},
                {"role": "assistant", "content": "Paris.", "tool_calls": [
                    {"id": "c3", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c3", "content": "noon"},
                {"role": "assistant", "content": "It is noon in Paris."},
                {"role": "user", "content": [
                    {"type": "text", "text": "And this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            ]),
        ];
        for messages in conversations {
            let chat = json!({"model": "m", "messages": messages, "tools": tools, "tool_choice": "required"});
            let anthropic = chat_request_to_messages(&chat).unwrap();
            let back = messages_request_to_chat(&anthropic).unwrap();
            assert_eq!(back["messages"], chat["messages"]);
            assert_eq!(back["tools"], chat["tools"]);
            assert_eq!(back["tool_choice"], chat["tool_choice"]);
            assert_eq!(back["max_tokens"], DEFAULT_MAX_TOKENS);
        }
    }

    #[test]
    fn responses_round_trip() {
        let message = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "Sure."},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": [1, 2]}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 7, "output_tokens": 9, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0}});
        let chat = messages_response_to_chat(&message, CREATED).unwrap();
        assert_eq!(chat_response_to_messages(&chat).unwrap(), message);
    }

    fn hostile_values() -> Vec<Value> {
        let mut deep = json!("leaf");
        for _ in 0..500 {
            deep = json!([{"messages": deep, "content": [1]}]);
        }
        let mut values = vec![
            json!(null),
            json!(1),
            json!("text"),
            json!([]),
            json!([[{}]]),
            json!({}),
            json!({"messages": 5}),
            json!({"messages": [5, null, []]}),
            json!({"messages": [{"role": 5}]}),
            json!({"messages": [{"role": "user"}]}),
            json!({"messages": [{"role": "user", "content": {"a": 1}}]}),
            json!({"messages": [{"role": "user", "content": [null, 1, {"type": 5}, {"type": "image_url"}, {"type": "image", "source": []}]}]}),
            json!({"messages": [{"role": "assistant", "tool_calls": [{"function": []}, null]}]}),
            json!({"messages": [{"role": "assistant", "tool_calls": {"id": 1}}]}),
            json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use"}]}]}),
            json!({"messages": [{"role": "tool"}, {"role": "tool", "content": 7}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": {"x": 1}}]}]}),
            json!({"messages": [], "tools": [null, {"type": "function"}, {"function": 1}], "tool_choice": []}),
            json!({"messages": [], "tools": {}, "tool_choice": {"type": "function", "function": "f"}}),
            json!({"messages": [], "system": [1, {"type": "text"}], "stop": [1], "stop_sequences": "x"}),
            json!({"messages": [], "max_tokens": -1, "temperature": "hot", "top_p": [], "metadata": 3, "user": {}}),
            json!({"messages": [], "max_tokens": 1e300, "temperature": f64::MAX, "n": -1}),
            json!({"id": 1, "choices": {}, "content": {}}),
            json!({"id": "x", "choices": [{"message": []}], "content": [null]}),
            json!({"id": "x", "choices": [null], "content": [{"type": "text"}]}),
            json!({"id": "x", "choices": [{"message": {"content": 5, "tool_calls": [1, {"function": {}}]}}], "usage": "x"}),
            json!({"id": "x", "choices": [{"message": {"tool_calls": {}}, "finish_reason": 3}], "usage": {"prompt_tokens": -5}}),
            json!({"id": "x", "content": [{"type": "tool_use", "id": 1}], "usage": [], "stop_reason": 1}),
            json!({"id": "x", "content": [], "usage": {"input_tokens": u64::MAX, "cache_read_input_tokens": u64::MAX, "output_tokens": u64::MAX}}),
        ];
        values
            .push(json!({"messages": deep.clone(), "tools": deep.clone(), "system": deep.clone()}));
        values.push(json!({"id": "x", "choices": deep.clone(), "content": deep.clone(), "usage": deep.clone()}));
        values.push(deep);
        values
    }

    #[test]
    fn no_input_shape_panics() {
        for value in hostile_values() {
            let _ = chat_request_to_messages(&value);
            let _ = messages_request_to_chat(&value);
            let _ = messages_response_to_chat(&value, CREATED);
            let _ = chat_response_to_messages(&value);
        }
    }
}

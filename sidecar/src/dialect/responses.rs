//! OpenAI's Responses API (`POST /v1/responses`) served by an upstream that only knows Chat
//! Completions (llama.cpp, vLLM, Ollama): the request becomes a chat request, and the chat
//! completion becomes a Response object. Such an upstream keeps no state between calls, so
//! whatever needs stored state is refused, never silently ignored.
//!
//! Request fields:
//!
//! | Responses | Chat Completions |
//! | --- | --- |
//! | `model` | `model` (copied; the caller rewrites it) |
//! | `instructions` | a first `system` message |
//! | `input` (text, or message / `function_call` / `function_call_output` items) | `messages` |
//! | `tools` (`function` only) | `tools` |
//! | `tool_choice` (`auto`, `none`, `required`, a named function) | `tool_choice` |
//! | `text.format` (`json_schema`, `json_object`) | `response_format` |
//! | `max_output_tokens` | `max_tokens` |
//! | `temperature`, `top_p`, `parallel_tool_calls`, `user` | the same |
//! | `stream` | `stream`, with `stream_options.include_usage` so the end has usage |
//!
//! Dropped, because losing them changes no answer:
//!
//! | field | why dropping is harmless |
//! | --- | --- |
//! | `store` | nothing is stored: the Response says `store: false`, and a later `previous_response_id` is refused |
//! | `metadata` | only echoed back in the Response, which it is |
//! | `service_tier` | a self-hosted server has a single tier |
//! | `safety_identifier` | abuse monitoring on OpenAI's side |
//! | `prompt_cache_key`, `prompt_cache_retention` | cache hints; the server caches prefixes on its own |
//! | `truncation: "disabled"` | what chat does anyway: an input too long for the context is an error |
//! | `stream_options` | its one option, `include_obfuscation`, pads events against side channels |
//! | `reasoning` items in `input` | the chat history has no place for them; the turns around them stay |
//! | `text.format` `text`, `text.verbosity: "medium"`, `background: false`, `top_logprobs: 0`, empty `include`, null fields | the defaults |
//!
//! Refused, naming the field: `previous_response_id`, `conversation`, `background: true` and
//! `prompt` (stored state), `reasoning`, `include`, `truncation: "auto"`, `top_logprobs`, other
//! `text.verbosity` values, built-in tools, other `tool_choice` forms, `input_file` and
//! uploaded-file images, `item_reference` and other input item types, and any unknown field.

use serde_json::{json, Map, Value};

use super::TranslateError;

/// Why stored state is refused: the app should learn where it does exist.
const STORED_STATE: &str = "stored responses, conversations, background runs and prompt \
     templates exist only on endpoints with `responses: native`; send the whole conversation \
     in `input` instead";

/// A chat id longer than this is cut: every item id and every streamed delta repeats it.
const MAX_CHAT_ID_CHARS: usize = 128;

/// The app's Responses request as a Chat Completions request.
pub fn responses_request_to_chat(request: &Value) -> Result<Value, TranslateError> {
    let fields = request
        .as_object()
        .ok_or_else(|| invalid("body", "must be a JSON object"))?;
    let mut chat = Map::new();
    // Fields first: a refused `prompt` or `previous_response_id` explains a missing input.
    for (name, value) in fields.iter().filter(|(_, value)| !value.is_null()) {
        translate_field(name, value, &mut chat)?;
    }
    chat.insert("messages".into(), Value::Array(messages(fields)?));
    Ok(Value::Object(chat))
}

fn translate_field(
    name: &str,
    value: &Value,
    chat: &mut Map<String, Value>,
) -> Result<(), TranslateError> {
    match name {
        "model" | "temperature" | "top_p" | "parallel_tool_calls" | "user" => {
            chat.insert(name.into(), value.clone());
        }
        "instructions" | "input" => {} // the messages, already made
        "max_output_tokens" => {
            chat.insert("max_tokens".into(), value.clone());
        }
        "stream" => stream(value, chat)?,
        "tools" => {
            let tools = tools(value)?;
            // Some servers refuse an empty list where OpenAI accepts one.
            if !tools.is_empty() {
                chat.insert("tools".into(), Value::Array(tools));
            }
        }
        "tool_choice" => {
            chat.insert("tool_choice".into(), tool_choice(value)?);
        }
        "text" => {
            if let Some(format) = text(value)? {
                chat.insert("response_format".into(), format);
            }
        }
        "previous_response_id" | "conversation" | "prompt" => {
            return Err(unsupported(name, STORED_STATE))
        }
        "background" if value != &Value::Bool(false) => {
            return Err(unsupported(name, STORED_STATE))
        }
        "reasoning" | "include" if is_set(value) => {
            return Err(unsupported(
                name,
                "a chat completion has no reasoning settings or extra output to include",
            ))
        }
        "truncation" if value != "disabled" => {
            return Err(unsupported(
                name,
                "the server cannot drop earlier turns for you; only `disabled` is possible",
            ))
        }
        "top_logprobs" if value != 0 => {
            return Err(unsupported(
                name,
                "log probabilities are not translated between the APIs",
            ))
        }
        "background" | "reasoning" | "include" | "truncation" | "top_logprobs" | "store"
        | "metadata" | "service_tier" | "safety_identifier" | "prompt_cache_key"
        | "prompt_cache_retention" | "stream_options" => {}
        _ => {
            return Err(unsupported(
                name,
                "this endpoint translates the Responses API to Chat Completions, which has no such field",
            ))
        }
    }
    Ok(())
}

/// False for what asks for nothing: null, `[]`, or an object whose fields are all null.
fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Array(items) => !items.is_empty(),
        Value::Object(fields) => fields.values().any(|v| !v.is_null()),
        _ => true,
    }
}

fn stream(value: &Value, chat: &mut Map<String, Value>) -> Result<(), TranslateError> {
    let stream = value
        .as_bool()
        .ok_or_else(|| invalid("stream", "must be a boolean"))?;
    chat.insert("stream".into(), Value::Bool(stream));
    if stream {
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(())
}

fn messages(request: &Map<String, Value>) -> Result<Vec<Value>, TranslateError> {
    let mut messages = Vec::new();
    match request.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "system", "content": text})),
        Some(_) => return Err(invalid("instructions", "must be a string")),
    }
    match request.get("input") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                add_input_item(index, item, &mut messages)?;
            }
        }
        Some(_) => return Err(invalid("input", "must be a string or an array of items")),
    }
    if messages.is_empty() {
        return Err(invalid("input", "is empty: there is nothing to answer"));
    }
    Ok(messages)
}

fn add_input_item(
    index: usize,
    item: &Value,
    messages: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    let path = format!("input[{index}]");
    let item = item
        .as_object()
        .ok_or_else(|| invalid(&path, "must be an object"))?;
    let kind = match item.get("type") {
        None | Some(Value::Null) if item.contains_key("role") => "message",
        Some(Value::String(kind)) => kind.as_str(),
        _ => return Err(invalid(&format!("{path}.type"), "must be a string")),
    };
    match kind {
        "message" => messages.push(message(&path, item)?),
        "function_call" => add_tool_call(messages, tool_call(&path, item)?),
        "function_call_output" => messages.push(tool_result(&path, item)?),
        // The model's own reasoning of an earlier turn: chat history has no place for it.
        "reasoning" => {}
        _ => {
            return Err(unsupported(
                &format!("{path}.type"),
                "only message, function_call, function_call_output and reasoning items can be \
                 sent to Chat Completions (an item_reference needs stored state)",
            ))
        }
    }
    Ok(())
}

fn message(path: &str, item: &Map<String, Value>) -> Result<Value, TranslateError> {
    let role = match item.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant" | "system")) => role,
        // Self-hosted chat templates know `system`; `developer` means the same to them.
        Some("developer") => "system",
        _ => {
            return Err(invalid(
                &format!("{path}.role"),
                "must be user, assistant, system or developer",
            ))
        }
    };
    let content = content(path, role == "user", item.get("content"))?;
    Ok(json!({"role": role, "content": content}))
}

/// A message's content: a string stays one; parts become chat parts, and a lone text part
/// becomes a plain string, which every server accepts.
fn content(
    path: &str,
    images_allowed: bool,
    content: Option<&Value>,
) -> Result<Value, TranslateError> {
    let parts = match content {
        Some(Value::String(text)) => return Ok(Value::String(text.clone())),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(invalid(
                &format!("{path}.content"),
                "must be a string or an array of content parts",
            ))
        }
    };
    let mut chat_parts = Vec::with_capacity(parts.len());
    for (index, part) in parts.iter().enumerate() {
        let path = format!("{path}.content[{index}]");
        chat_parts.push(content_part(&path, images_allowed, part)?);
    }
    match chat_parts.as_slice() {
        [part] if part["type"] == "text" => Ok(part["text"].clone()),
        _ => Ok(Value::Array(chat_parts)),
    }
}

fn content_part(path: &str, images_allowed: bool, part: &Value) -> Result<Value, TranslateError> {
    match part.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text") => Ok(text_part(string_field(path, part, "text")?)),
        // An earlier answer's refusal is what the model said.
        Some("refusal") => Ok(text_part(string_field(path, part, "refusal")?)),
        Some("input_image") if images_allowed => image_part(path, part),
        Some("input_image") => Err(unsupported(
            &format!("{path}.type"),
            "Chat Completions takes images only in user messages",
        )),
        Some(_) => Err(unsupported(
            &format!("{path}.type"),
            "only text and images can be sent to Chat Completions (files cannot)",
        )),
        None => Err(invalid(&format!("{path}.type"), "must be a string")),
    }
}

fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

fn image_part(path: &str, part: &Value) -> Result<Value, TranslateError> {
    let Some(url) = part.get("image_url").and_then(Value::as_str) else {
        return match part.get("file_id") {
            Some(Value::String(_)) => Err(unsupported(
                &format!("{path}.file_id"),
                "uploaded files exist only at OpenAI; send the image as an https: or data: URL",
            )),
            _ => Err(invalid(&format!("{path}.image_url"), "must be a string")),
        };
    };
    let mut image_url = Map::new();
    image_url.insert("url".into(), url.into());
    if let Some(detail) = part.get("detail").and_then(Value::as_str) {
        image_url.insert("detail".into(), detail.into());
    }
    Ok(json!({"type": "image_url", "image_url": image_url}))
}

fn tool_call(path: &str, item: &Map<String, Value>) -> Result<Value, TranslateError> {
    let field = |name: &str| {
        item.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&format!("{path}.{name}"), "must be a string"))
    };
    Ok(json!({
        "id": field("call_id")?,
        "type": "function",
        "function": {"name": field("name")?, "arguments": field("arguments")?},
    }))
}

/// Chat wants all calls of a turn in one assistant message, with the text said before them.
fn add_tool_call(messages: &mut Vec<Value>, call: Value) {
    match messages.last_mut() {
        Some(Value::Object(last))
            if last.get("role").and_then(Value::as_str) == Some("assistant") =>
        {
            match last.get_mut("tool_calls") {
                Some(Value::Array(calls)) => calls.push(call),
                _ => {
                    last.insert("tool_calls".into(), Value::Array(vec![call]));
                }
            }
        }
        _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
    }
}

fn tool_result(path: &str, item: &Map<String, Value>) -> Result<Value, TranslateError> {
    let call_id = item
        .get("call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(&format!("{path}.call_id"), "must be a string"))?;
    let output = match item.get("output") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => tool_output_text(path, parts)?,
        _ => {
            return Err(invalid(
                &format!("{path}.output"),
                "must be a string or an array of content parts",
            ))
        }
    };
    Ok(json!({"role": "tool", "tool_call_id": call_id, "content": output}))
}

fn tool_output_text(path: &str, parts: &[Value]) -> Result<String, TranslateError> {
    let mut text = String::new();
    for (index, part) in parts.iter().enumerate() {
        let path = format!("{path}.output[{index}]");
        match part.get("type").and_then(Value::as_str) {
            Some("input_text") => text.push_str(string_field(&path, part, "text")?),
            _ => {
                return Err(unsupported(
                    &format!("{path}.type"),
                    "a chat tool result can only hold text",
                ))
            }
        }
    }
    Ok(text)
}

fn string_field<'a>(path: &str, value: &'a Value, name: &str) -> Result<&'a str, TranslateError> {
    value
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(&format!("{path}.{name}"), "must be a string"))
}

fn tools(value: &Value) -> Result<Vec<Value>, TranslateError> {
    let tools = value
        .as_array()
        .ok_or_else(|| invalid("tools", "must be an array"))?;
    let mut chat_tools = Vec::with_capacity(tools.len());
    for (index, tool) in tools.iter().enumerate() {
        let path = format!("tools[{index}]");
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => chat_tools.push(function_tool(&path, tool)?),
            Some(_) => return Err(unsupported(
                &format!("{path}.type"),
                "built-in tools run on OpenAI's servers; this endpoint serves only function tools",
            )),
            None => return Err(invalid(&format!("{path}.type"), "must be a string")),
        }
    }
    Ok(chat_tools)
}

fn function_tool(path: &str, tool: &Value) -> Result<Value, TranslateError> {
    let mut function = Map::new();
    function.insert("name".into(), string_field(path, tool, "name")?.into());
    for name in ["description", "parameters", "strict"] {
        if let Some(value) = tool.get(name).filter(|v| !v.is_null()) {
            function.insert(name.into(), value.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

fn tool_choice(value: &Value) -> Result<Value, TranslateError> {
    match value {
        Value::String(mode) if matches!(mode.as_str(), "auto" | "none" | "required") => {
            Ok(value.clone())
        }
        Value::String(_) => Err(invalid("tool_choice", "must be auto, none or required")),
        Value::Object(choice) if choice.get("type").and_then(Value::as_str) == Some("function") => {
            let name = string_field("tool_choice", value, "name")?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(unsupported(
            "tool_choice",
            "Chat Completions can only be told auto, none, required or one function",
        )),
    }
}

/// `text` as a chat `response_format`, if it asks for more than plain text.
fn text(value: &Value) -> Result<Option<Value>, TranslateError> {
    let text = value
        .as_object()
        .ok_or_else(|| invalid("text", "must be an object"))?;
    for (name, value) in text.iter().filter(|(_, value)| !value.is_null()) {
        match name.as_str() {
            "format" => {}
            "verbosity" if value == "medium" => {}
            _ => {
                return Err(unsupported(
                    &format!("text.{name}"),
                    "Chat Completions servers have no such text setting",
                ))
            }
        }
    }
    let Some(format) = text.get("format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => Ok(Some(json_schema(format)?)),
        Some(_) => Err(unsupported(
            "text.format.type",
            "only text, json_object and json_schema formats exist in Chat Completions",
        )),
        None => Err(invalid("text.format.type", "must be a string")),
    }
}

fn json_schema(format: &Value) -> Result<Value, TranslateError> {
    let mut schema = Map::new();
    schema.insert(
        "name".into(),
        string_field("text.format", format, "name")?.into(),
    );
    let body = format
        .get("schema")
        .filter(|v| v.is_object())
        .ok_or_else(|| invalid("text.format.schema", "must be an object"))?;
    schema.insert("schema".into(), body.clone());
    for name in ["strict", "description"] {
        if let Some(value) = format.get(name).filter(|v| !v.is_null()) {
            schema.insert(name.into(), value.clone());
        }
    }
    Ok(json!({"type": "json_schema", "json_schema": schema}))
}

fn invalid(param: &str, why: &str) -> TranslateError {
    TranslateError::Invalid {
        param: param.to_string(),
        why: why.to_string(),
    }
}

fn unsupported(param: &str, why: &'static str) -> TranslateError {
    TranslateError::Unsupported {
        param: param.to_string(),
        why,
    }
}

/// The upstream's chat completion as the Response object the app asked for. `request` is the
/// app's Responses request, whose settings the Response echoes; `created_at` is unix seconds.
pub fn chat_response_to_responses(
    chat: &Value,
    request: &Value,
    created_at: u64,
) -> Result<Value, TranslateError> {
    let choice = chat
        .get("choices")
        .and_then(|choices| choices.get(0))
        .ok_or_else(|| upstream("the chat completion has no choices"))?;
    let message = choice
        .get("message")
        .filter(|m| m.is_object())
        .ok_or_else(|| upstream("the chat completion's choice has no message"))?;
    let text = match message.get("content") {
        None | Some(Value::Null) => "",
        Some(Value::String(text)) => text,
        Some(_) => return Err(upstream("the chat message's content is not a string")),
    };
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(calls)) => calls,
        Some(_) => return Err(upstream("the chat message's tool_calls is not an array")),
    };
    let chat_id = chat_id(chat, created_at);
    let outcome = Outcome::from_finish_reason(choice.get("finish_reason").and_then(Value::as_str));
    let items = usize::from(!text.is_empty()).saturating_add(calls.len());
    let mut output = Vec::with_capacity(items);
    if !text.is_empty() {
        let status = outcome.item_status(items == 1);
        output.push(message_item(
            &message_id(&chat_id, 0),
            status,
            vec![output_text(text)],
        ));
    }
    for call in calls {
        let index = output.len();
        let call = FunctionCall::from_chat(call, &chat_id, index)?;
        let status = outcome.item_status(index.saturating_add(1) == items);
        output.push(call.item(&function_call_id(&chat_id, index), status));
    }
    let echo = Echo::of(request);
    Ok(echo.response(Parts {
        chat_id: &chat_id,
        model: chat.get("model").and_then(Value::as_str),
        created_at,
        outcome,
        output,
        usage: usage(chat.get("usage")),
    }))
}

fn upstream(why: &str) -> TranslateError {
    TranslateError::Upstream(why.to_string())
}

/// The chat completion's id (of a completion or of a stream's chunk), on which every id of
/// the Response is built, so that the ids of one response are stable.
pub(super) fn chat_id(chat: &Value, created_at: u64) -> String {
    match chat.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => id.chars().take(MAX_CHAT_ID_CHARS).collect(),
        _ => format!("chatcmpl-{created_at}"),
    }
}

pub(super) fn message_id(chat_id: &str, output_index: usize) -> String {
    format!("msg_{chat_id}_{output_index}")
}

pub(super) fn function_call_id(chat_id: &str, output_index: usize) -> String {
    format!("fc_{chat_id}_{output_index}")
}

/// How the chat completion ended, in the Responses API's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    InProgress,
    Completed,
    /// With the reason of `incomplete_details`.
    Incomplete(&'static str),
}

impl Outcome {
    pub(super) fn from_finish_reason(finish_reason: Option<&str>) -> Self {
        match finish_reason {
            Some("length") => Self::Incomplete("max_output_tokens"),
            Some("content_filter") => Self::Incomplete("content_filter"),
            _ => Self::Completed,
        }
    }

    fn status(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Incomplete(_) => "incomplete",
        }
    }

    /// An output item's status: only the last item is the one that was cut short.
    pub(super) fn item_status(self, is_last: bool) -> &'static str {
        match self {
            Self::Incomplete(_) if is_last => "incomplete",
            Self::InProgress => "in_progress",
            _ => "completed",
        }
    }
}

/// `{"type": "message", ...}` with the given content parts.
pub(super) fn message_item(id: &str, status: &str, content: Vec<Value>) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

/// An `output_text` content part.
pub(super) fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// One function call of the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FunctionCall {
    pub call_id: String,
    pub name: String,
    pub arguments: String,
}

impl FunctionCall {
    /// A chat `tool_calls` entry. A server that gives no call id gets one made up, as the app
    /// must send it back with the call's result.
    fn from_chat(call: &Value, chat_id: &str, output_index: usize) -> Result<Self, TranslateError> {
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| upstream("a chat tool call has no function name"))?;
        let arguments = match function.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(arguments)) => arguments.clone(),
            // Some servers give the arguments as a JSON object rather than its text.
            Some(arguments) => arguments.to_string(),
        };
        Ok(Self {
            call_id: call_id(call.get("id"), chat_id, output_index),
            name: name.to_string(),
            arguments,
        })
    }

    pub(super) fn item(&self, id: &str, status: &str) -> Value {
        json!({
            "type": "function_call",
            "id": id,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "status": status,
        })
    }
}

/// A chat tool call's id, or one made from the response's when the server gave none.
pub(super) fn call_id(id: Option<&Value>, chat_id: &str, output_index: usize) -> String {
    match id.and_then(Value::as_str) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => format!("call_{chat_id}_{output_index}"),
    }
}

/// A chat `usage` object in the Responses API's words; null when the upstream gave none.
pub(super) fn usage(chat_usage: Option<&Value>) -> Value {
    let Some(chat_usage) = chat_usage.filter(|u| u.is_object()) else {
        return Value::Null;
    };
    let count = |pointer: &str| {
        chat_usage
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let input = count("/prompt_tokens");
    let output = count("/completion_tokens");
    let total = chat_usage
        .get("total_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(input.saturating_add(output));
    json!({
        "input_tokens": input,
        // The SDK requires `cache_write_tokens`; chat servers report no cache writes.
        "input_tokens_details": {
            "cached_tokens": count("/prompt_tokens_details/cached_tokens"),
            "cache_write_tokens": count("/prompt_tokens_details/cache_write_tokens"),
        },
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": count("/completion_tokens_details/reasoning_tokens")},
        "total_tokens": total,
    })
}

/// The fields of a Response that echo the request, taken once so that a stream need not keep
/// the request (whose input may be large).
pub(super) struct Echo {
    fields: Map<String, Value>,
    model: Value,
}

/// What a Response says beyond the echo.
pub(super) struct Parts<'a> {
    pub chat_id: &'a str,
    /// The model the upstream named; the request's when it named none.
    pub model: Option<&'a str>,
    pub created_at: u64,
    pub outcome: Outcome,
    pub output: Vec<Value>,
    pub usage: Value,
}

impl Echo {
    pub(super) fn of(request: &Value) -> Self {
        let given = |name: &str| request.get(name).filter(|v| !v.is_null()).cloned();
        let or = |name: &str, default: Value| given(name).unwrap_or(default);
        let mut fields = Map::new();
        for name in [
            "instructions",
            "temperature",
            "top_p",
            "max_output_tokens",
            "user",
        ] {
            fields.insert(name.into(), or(name, Value::Null));
        }
        fields.insert("metadata".into(), or("metadata", json!({})));
        fields.insert(
            "parallel_tool_calls".into(),
            or("parallel_tool_calls", Value::Bool(true)),
        );
        fields.insert("tool_choice".into(), or("tool_choice", json!("auto")));
        fields.insert("tools".into(), or("tools", json!([])));
        fields.insert(
            "text".into(),
            or("text", json!({"format": {"type": "text"}})),
        );
        fields.insert("previous_response_id".into(), Value::Null);
        fields.insert("reasoning".into(), json!({"effort": null, "summary": null}));
        fields.insert("store".into(), Value::Bool(false));
        fields.insert("truncation".into(), json!("disabled"));
        fields.insert("background".into(), Value::Bool(false));
        fields.insert("error".into(), Value::Null);
        Self {
            fields,
            model: or("model", json!("")),
        }
    }

    pub(super) fn response(&self, parts: Parts<'_>) -> Value {
        let mut response = self.fields.clone();
        let incomplete_details = match parts.outcome {
            Outcome::Incomplete(reason) => json!({"reason": reason}),
            _ => Value::Null,
        };
        let model = parts.model.map_or_else(|| self.model.clone(), Value::from);
        response.insert("id".into(), format!("resp_{}", parts.chat_id).into());
        response.insert("object".into(), json!("response"));
        response.insert("created_at".into(), parts.created_at.into());
        response.insert("status".into(), parts.outcome.status().into());
        response.insert("incomplete_details".into(), incomplete_details);
        response.insert("model".into(), model);
        response.insert("output".into(), Value::Array(parts.output));
        response.insert("usage".into(), parts.usage);
        Value::Object(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED_AT: u64 = 1_750_000_000;

    fn fixture(text: &str) -> Vec<Value> {
        let value: Value = serde_json::from_str(text).unwrap();
        value.as_array().unwrap().clone()
    }

    fn check_request_cases(text: &str) {
        for case in fixture(text) {
            let name = &case["case"];
            let chat = responses_request_to_chat(&case["request"]);
            assert_eq!(
                chat.as_ref().ok(),
                Some(&case["chat"]),
                "case {name}: {chat:?}"
            );
        }
    }

    #[test]
    fn input_text_items_history_instructions_and_images() {
        check_request_cases(include_str!("fixtures/responses/request_input.json"));
    }

    #[test]
    fn function_tools_calls_results_and_tool_choice() {
        check_request_cases(include_str!("fixtures/responses/request_tools.json"));
    }

    #[test]
    fn text_format_max_output_tokens_stream_and_dropped_fields() {
        check_request_cases(include_str!("fixtures/responses/request_options.json"));
    }

    #[test]
    fn refused_parameters_are_named() {
        for case in fixture(include_str!("fixtures/responses/request_refused.json")) {
            let error = responses_request_to_chat(&case["request"]).unwrap_err();
            assert_eq!(error.param(), case["param"].as_str(), "{error}");
            let kind = match error {
                TranslateError::Unsupported { .. } => "unsupported",
                TranslateError::Invalid { .. } => "invalid",
                TranslateError::Upstream(_) => "upstream",
            };
            assert_eq!(kind, case["kind"], "param {}", case["param"]);
        }
    }

    #[test]
    fn stored_state_is_refused_saying_where_it_exists() {
        let request = json!({"model": "m", "input": "hi", "previous_response_id": "resp_1"});
        let error = responses_request_to_chat(&request).unwrap_err();
        assert!(error.to_string().contains("`responses: native`"), "{error}");
    }

    fn check_response_case(text: &str) {
        let case: Value = serde_json::from_str(text).unwrap();
        let response = chat_response_to_responses(&case["chat"], &case["request"], CREATED_AT);
        assert_eq!(
            response.as_ref().ok(),
            Some(&case["response"]),
            "{response:?}"
        );
    }

    #[test]
    fn a_text_answer_becomes_a_completed_response() {
        check_response_case(include_str!("fixtures/responses/response_text.json"));
    }

    #[test]
    fn tool_calls_become_function_call_items_after_the_text() {
        check_response_case(include_str!("fixtures/responses/response_tool_calls.json"));
    }

    #[test]
    fn an_answer_cut_at_the_token_limit_is_incomplete() {
        check_response_case(include_str!("fixtures/responses/response_length.json"));
    }

    #[test]
    fn a_content_filter_stop_is_incomplete_and_usage_may_be_missing() {
        let chat = json!({"id": "c", "choices": [{"message": {"content": null}, "finish_reason": "content_filter"}]});
        let response = chat_response_to_responses(&chat, &json!({"model": "m"}), 1).unwrap();
        assert_eq!(response["status"], "incomplete");
        assert_eq!(
            response["incomplete_details"],
            json!({"reason": "content_filter"})
        );
        assert_eq!(response["output"], json!([]));
        assert_eq!(response["usage"], Value::Null);
        assert_eq!(response["model"], "m");
    }

    #[test]
    fn an_upstream_answer_that_is_not_a_chat_completion_is_an_upstream_error() {
        for chat in [
            json!({}),
            json!({"choices": []}),
            json!({"choices": [{"message": "hi"}]}),
            json!({"choices": [{"message": {"content": 3}}]}),
            json!({"choices": [{"message": {"tool_calls": [{"function": {}}]}}]}),
        ] {
            let error = chat_response_to_responses(&chat, &json!({}), 1).unwrap_err();
            assert!(
                matches!(error, TranslateError::Upstream(_)),
                "{chat}: {error}"
            );
        }
    }

    #[test]
    fn ids_are_stable_and_a_missing_or_huge_chat_id_is_handled() {
        assert_eq!(chat_id(&json!({"id": "x"}), 5), "x");
        assert_eq!(chat_id(&json!({}), 5), "chatcmpl-5");
        let huge = "é".repeat(10_000);
        assert_eq!(
            chat_id(&json!({"id": huge}), 5).chars().count(),
            MAX_CHAT_ID_CHARS
        );
        assert_eq!(call_id(None, "x", 2), "call_x_2");
    }

    /// Every value of each fixture, swapped in turn for values of other types, must give a
    /// result or an error, never a panic.
    fn mutations(value: &Value) -> Vec<Value> {
        let hostile = [
            Value::Null,
            json!(-1),
            json!(1e308),
            json!(u64::MAX),
            json!(""),
            json!("function_call"),
            json!([]),
            json!([null, {}]),
            json!({}),
            json!({"type": "function_call"}),
        ];
        let mut out = Vec::new();
        let mut paths = Vec::new();
        collect_paths(value, String::new(), &mut paths);
        for path in paths {
            for replacement in &hostile {
                let mut mutated = value.clone();
                if let Some(slot) = mutated.pointer_mut(&path) {
                    *slot = replacement.clone();
                }
                out.push(mutated);
            }
        }
        out
    }

    fn collect_paths(value: &Value, path: String, paths: &mut Vec<String>) {
        match value {
            Value::Object(fields) => {
                for (name, child) in fields {
                    collect_paths(child, format!("{path}/{name}"), paths);
                }
            }
            Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    collect_paths(child, format!("{path}/{index}"), paths);
                }
            }
            _ => {}
        }
        paths.push(path);
    }

    #[test]
    fn hostile_requests_and_upstream_answers_do_not_panic() {
        for text in [
            include_str!("fixtures/responses/request_input.json"),
            include_str!("fixtures/responses/request_tools.json"),
            include_str!("fixtures/responses/request_options.json"),
        ] {
            for case in fixture(text) {
                for request in mutations(&case["request"]) {
                    let _ = responses_request_to_chat(&request);
                }
            }
        }
        for text in [
            include_str!("fixtures/responses/response_text.json"),
            include_str!("fixtures/responses/response_tool_calls.json"),
            include_str!("fixtures/responses/response_length.json"),
        ] {
            let case: Value = serde_json::from_str(text).unwrap();
            for chat in mutations(&case["chat"]) {
                let _ = chat_response_to_responses(&chat, &case["request"], CREATED_AT);
            }
            for request in mutations(&case["request"]) {
                let _ = chat_response_to_responses(&case["chat"], &request, CREATED_AT);
            }
        }
    }
}

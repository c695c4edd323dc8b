//! The APIs apps call and endpoints are sent: OpenAI's Chat Completions and Responses, and
//! Anthropic's Messages. When the app's API is not one its endpoint serves, the request is
//! translated on its way up, and the answer (JSON, stream or error) on its way back, so that
//! either vendor's SDK works with any endpoint. docs/providers.md lists what is translated,
//! dropped and refused.

mod anthropic;
mod anthropic_stream;
pub mod envelope;
mod error;
mod responses;
mod responses_stream;
pub mod sse;
mod stop_reason;
mod usage;

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::config::{EndpointConfig, ProviderKind, ResponsesMode};
pub use error::TranslateError;
use sse::{SseEvent, SseParser, StreamTranslator, TranslatingStream};

/// An API that the sidecar can translate to and from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's `POST /v1/chat/completions`.
    Chat,
    /// Anthropic's `POST /v1/messages`.
    Messages,
    /// OpenAI's `POST /v1/responses`.
    Responses,
}

impl Dialect {
    /// The API of an app's call to `/v1{api_path}`; None for the routes that are never
    /// translated (embeddings, files, ...).
    pub fn of_route(api_path: &str) -> Option<Self> {
        match api_path {
            "/chat/completions" => Some(Self::Chat),
            "/messages" | "/messages/count_tokens" => Some(Self::Messages),
            "/responses" => Some(Self::Responses),
            _ => None,
        }
    }

    /// The envelope an app's errors come in, from its request path: Anthropic's for its
    /// routes, OpenAI's for everything else.
    pub fn of_errors(path: &str) -> Self {
        match path.strip_prefix("/v1") {
            Some(api_path) if api_path == "/messages" || api_path.starts_with("/messages/") => {
                Self::Messages
            }
            Some("/responses") => Self::Responses,
            _ => Self::Chat,
        }
    }

    fn route(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Messages => "/messages",
            Self::Responses => "/responses",
        }
    }
}

/// How an endpoint serves one app call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Sent as the app sent it (with the endpoint's model).
    Native,
    Translated(Translation),
    /// The endpoint's provider has no such API and no translation reaches it.
    NotServed,
}

/// What an app call to `/v1{api_path}` becomes on `endpoint`.
pub fn plan(api_path: &str, endpoint: &EndpointConfig) -> Plan {
    let anthropic = endpoint.provider == ProviderKind::Anthropic;
    let translated = |app, wire| Plan::Translated(Translation { app, wire });
    match (Dialect::of_route(api_path), api_path) {
        (Some(Dialect::Chat), _) if anthropic => translated(Dialect::Chat, Dialect::Messages),
        // The mock answers Anthropic's API itself.
        (Some(Dialect::Messages), _) if endpoint.provider == ProviderKind::Mock => Plan::Native,
        (Some(Dialect::Messages), "/messages") if !anthropic => {
            translated(Dialect::Messages, Dialect::Chat)
        }
        // Counting tokens is Anthropic's own; no chat server has an equivalent.
        (Some(Dialect::Messages), _) if !anthropic => Plan::NotServed,
        (Some(Dialect::Responses), _) if anthropic => {
            translated(Dialect::Responses, Dialect::Messages)
        }
        (Some(Dialect::Responses), _) => match endpoint.responses_mode() {
            ResponsesMode::Native => Plan::Native,
            ResponsesMode::Translate => translated(Dialect::Responses, Dialect::Chat),
        },
        // OpenAI's other JSON routes (completions, embeddings) do not exist at Anthropic.
        (None, _) if anthropic => Plan::NotServed,
        _ => Plan::Native,
    }
}

/// One pairing of the app's API and the endpoint's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    app: Dialect,
    wire: Dialect,
}

impl Translation {
    pub fn app(&self) -> Dialect {
        self.app
    }

    pub fn wire(&self) -> Dialect {
        self.wire
    }

    /// The path under `/v1` the translated request goes to.
    pub fn upstream_route(&self) -> &'static str {
        self.wire.route()
    }

    /// The app's request body in the endpoint's API, with the endpoint's `model`.
    pub fn request(
        &self,
        body: &[u8],
        endpoint: &EndpointConfig,
    ) -> Result<Vec<u8>, TranslateError> {
        let app_request: Value =
            serde_json::from_slice(body).map_err(|e| TranslateError::Invalid {
                param: "body".to_string(),
                why: e.to_string(),
            })?;
        let mut translated = match (self.app, self.wire) {
            (Dialect::Chat, Dialect::Messages) => {
                anthropic::chat_request_to_messages(&app_request)?
            }
            (Dialect::Messages, Dialect::Chat) => {
                anthropic::messages_request_to_chat(&app_request)?
            }
            (Dialect::Responses, Dialect::Chat) => {
                responses::responses_request_to_chat(&app_request)?
            }
            (Dialect::Responses, Dialect::Messages) => anthropic::chat_request_to_messages(
                &responses::responses_request_to_chat(&app_request)?,
            )?,
            (app, wire) => return Err(unpaired(app, wire)),
        };
        if let Some(object) = translated.as_object_mut() {
            object.insert("model".to_string(), Value::String(endpoint.model.clone()));
            // The translation asks chat servers for usage in streams; Azure's older API
            // versions refuse the whole request for it.
            if self.wire == Dialect::Chat {
                if !crate::provider::accepts_stream_options(endpoint) {
                    object.remove("stream_options");
                }
                if crate::provider::takes_max_completion_tokens(endpoint) {
                    if let Some(max) = object.remove("max_tokens") {
                        object.insert("max_completion_tokens".to_string(), max);
                    }
                }
            }
        }
        // Serializing a Value into a Vec cannot fail.
        Ok(serde_json::to_vec(&translated).unwrap_or_default())
    }

    /// A successful (2xx) JSON answer of the endpoint, in the app's API. `app_request` is the
    /// app's own request body (the Responses API echoes parts of it).
    pub fn response(&self, body: &[u8], app_request: &[u8]) -> Result<Vec<u8>, TranslateError> {
        let upstream: Value = serde_json::from_slice(body)
            .map_err(|e| TranslateError::Upstream(format!("its body is not JSON: {e}")))?;
        let now = unix_now();
        let translated = match (self.app, self.wire) {
            (Dialect::Chat, Dialect::Messages) => {
                anthropic::messages_response_to_chat(&upstream, now)?
            }
            (Dialect::Messages, Dialect::Chat) => anthropic::chat_response_to_messages(&upstream)?,
            (Dialect::Responses, wire) => {
                let chat = match wire {
                    Dialect::Messages => anthropic::messages_response_to_chat(&upstream, now)?,
                    _ => upstream,
                };
                responses::chat_response_to_responses(&chat, &parse_or_null(app_request), now)?
            }
            (app, wire) => return Err(unpaired(app, wire)),
        };
        Ok(serde_json::to_vec(&translated).unwrap_or_default())
    }

    /// An error answer of the endpoint (status kept) in the app's envelope.
    pub fn error(&self, status: u16, body: &[u8]) -> Vec<u8> {
        let value = match self.app {
            Dialect::Messages => envelope::to_anthropic(status, body),
            Dialect::Chat | Dialect::Responses => envelope::to_openai(status, body),
        };
        serde_json::to_vec(&value).unwrap_or_default()
    }

    /// The translator of the endpoint's stream into the app's.
    pub fn stream(&self, app_request: &[u8]) -> TranslatingStream {
        let now = unix_now();
        let to_responses = |request: &[u8]| {
            responses_stream::ChatToResponsesStream::new(&parse_or_null(request), now)
        };
        let translator: Box<dyn StreamTranslator> = match (self.app, self.wire) {
            (Dialect::Chat, Dialect::Messages) => {
                Box::new(anthropic_stream::MessagesToChatStream::new(now))
            }
            (Dialect::Messages, Dialect::Chat) => {
                Box::new(anthropic_stream::ChatToMessagesStream::new())
            }
            (Dialect::Responses, Dialect::Messages) => Box::new(Chained::new(
                Box::new(anthropic_stream::MessagesToChatStream::new(now)),
                Box::new(to_responses(app_request)),
            )),
            // Responses over chat, and any pairing `plan` never makes.
            _ => Box::new(to_responses(app_request)),
        };
        TranslatingStream::new(translator)
    }
}

fn unpaired(app: Dialect, wire: Dialect) -> TranslateError {
    TranslateError::Upstream(format!("no translation from {app:?} to {wire:?}"))
}

fn parse_or_null(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Two translations in a row (Anthropic's stream → chat chunks → Responses events): the
/// first one's events are parsed again as they are written, so nothing waits.
struct Chained {
    first: Box<dyn StreamTranslator>,
    parser: SseParser,
    second: Box<dyn StreamTranslator>,
}

impl Chained {
    fn new(first: Box<dyn StreamTranslator>, second: Box<dyn StreamTranslator>) -> Self {
        Self {
            first,
            parser: SseParser::default(),
            second,
        }
    }

    fn pass_on(&mut self, between: &[u8], out: &mut Vec<u8>) {
        let second = &mut self.second;
        // The first translator writes whole, small events: they cannot exceed the bound.
        let _ = self
            .parser
            .push(between, &mut |event| second.event(event, out));
    }
}

impl StreamTranslator for Chained {
    fn event(&mut self, event: SseEvent<'_>, out: &mut Vec<u8>) {
        let mut between = Vec::new();
        self.first.event(event, &mut between);
        self.pass_on(&between, out);
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        let mut between = Vec::new();
        self.first.finish(&mut between);
        self.pass_on(&between, out);
        self.second.finish(out);
    }

    fn ended(&self) -> bool {
        self.second.ended()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(yaml: &str) -> EndpointConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn each_pairing_of_route_and_provider_has_its_plan() {
        let claude = endpoint("{name: c, provider: anthropic, model: m, credential: {file: /k}}");
        let openai = endpoint("{name: o, provider: openai, model: m, credential: {file: /k}}");
        let local =
            endpoint("{name: l, provider: openai-compatible, model: m, baseUrl: 'http://x/v1'}");
        let mock = endpoint("{name: k, provider: mock, model: m}");
        let translated = |app, wire| Plan::Translated(Translation { app, wire });
        use Dialect::*;
        for (route, endpoint, expected) in [
            ("/chat/completions", &claude, translated(Chat, Messages)),
            ("/chat/completions", &openai, Plan::Native),
            ("/messages", &claude, Plan::Native),
            ("/messages", &openai, translated(Messages, Chat)),
            ("/messages", &local, translated(Messages, Chat)),
            ("/messages", &mock, Plan::Native),
            ("/messages/count_tokens", &claude, Plan::Native),
            ("/messages/count_tokens", &local, Plan::NotServed),
            ("/responses", &openai, Plan::Native),
            ("/responses", &local, translated(Responses, Chat)),
            ("/responses", &mock, translated(Responses, Chat)),
            ("/responses", &claude, translated(Responses, Messages)),
            ("/embeddings", &claude, Plan::NotServed),
            ("/embeddings", &local, Plan::Native),
        ] {
            assert_eq!(
                plan(route, endpoint),
                expected,
                "{route} on {}",
                endpoint.name
            );
        }
        let native = endpoint(
            "{name: v, provider: openai-compatible, model: m, baseUrl: 'http://x/v1', responses: native}",
        );
        assert_eq!(plan("/responses", &native), Plan::Native);
    }

    #[test]
    fn openai_gets_max_completion_tokens_and_self_hosted_servers_max_tokens() {
        let messages =
            br#"{"model":"x","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
        let translation = Translation {
            app: Dialect::Messages,
            wire: Dialect::Chat,
        };
        let sent = |yaml: &str| -> Value {
            serde_json::from_slice(&translation.request(messages, &endpoint(yaml)).unwrap())
                .unwrap()
        };
        let openai = sent("{name: o, provider: openai, model: gpt-5, credential: {file: /k}}");
        assert_eq!(openai["max_completion_tokens"], 100);
        assert!(openai.get("max_tokens").is_none());
        assert_eq!(openai["model"], "gpt-5");
        let local =
            sent("{name: l, provider: openai-compatible, model: m, baseUrl: 'http://x/v1'}");
        assert_eq!(local["max_tokens"], 100);
        let old_azure = sent(
            "{name: a, provider: azure-openai, model: m, baseUrl: 'https://r.openai.azure.com', credential: {file: /k}, azure: {apiVersion: '2024-06-01'}}",
        );
        assert_eq!(old_azure["max_tokens"], 100);
    }

    #[test]
    fn errors_come_in_the_envelope_of_the_route_the_app_called() {
        assert_eq!(Dialect::of_errors("/v1/messages"), Dialect::Messages);
        assert_eq!(
            Dialect::of_errors("/v1/messages/count_tokens"),
            Dialect::Messages
        );
        assert_eq!(Dialect::of_errors("/v1/messagesx"), Dialect::Chat);
        assert_eq!(Dialect::of_errors("/v1/responses"), Dialect::Responses);
        assert_eq!(Dialect::of_errors("/v2/messages"), Dialect::Chat);
    }
}

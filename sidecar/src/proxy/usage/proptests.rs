//! The usage tap reads every upstream response as it passes, in whatever pieces the network
//! delivers: the pieces must not change what it finds, and no bytes may make it panic.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

const FINISH_REASONS: &[&str] = &["stop", "length", "tool_calls", "content_filter"];

/// One SSE event (or line) an OpenAI-style server may send.
#[derive(Debug, Clone)]
enum Event {
    Content(String),
    Finish(&'static str),
    Usage {
        prompt: u64,
        completion: u64,
    },
    ResponsesUsage {
        input: u64,
        output: u64,
    },
    /// A usage whose numbers do not fit (`1e30`, `-1`, 30 digits): no usage, no panic.
    OutOfRangeUsage(String),
    Comment(String),
    Done,
}

impl Event {
    fn text(&self, newline: &str) -> String {
        let data = |json: serde_json::Value| format!("data: {json}{newline}{newline}");
        match self {
            Self::Content(text) => data(serde_json::json!({
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}],
                "usage": null,
            })),
            Self::Finish(reason) => data(serde_json::json!({
                "choices": [{"index": 0, "delta": {}, "finish_reason": reason}],
            })),
            Self::Usage { prompt, completion } => data(serde_json::json!({
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt.saturating_add(*completion),
                },
            })),
            Self::ResponsesUsage { input, output } => format!(
                "event: response.completed{newline}{}",
                data(serde_json::json!({
                    "type": "response.completed",
                    "response": {"usage": {"input_tokens": input, "output_tokens": output}},
                }))
            ),
            Self::OutOfRangeUsage(number) => format!(
                "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{number},\"completion_tokens\":{number}}}}}{newline}{newline}"
            ),
            Self::Comment(text) => format!(": {text}{newline}{newline}"),
            Self::Done => format!("data: [DONE]{newline}{newline}"),
        }
    }
}

fn event() -> impl Strategy<Value = Event> {
    let tokens = prop_oneof![any::<u64>(), Just(u64::MAX), 0u64..100_000];
    prop_oneof![
        4 => any::<String>().prop_map(Event::Content),
        1 => prop::sample::select(FINISH_REASONS).prop_map(Event::Finish),
        1 => (tokens.clone(), tokens.clone())
            .prop_map(|(prompt, completion)| Event::Usage { prompt, completion }),
        1 => (tokens.clone(), tokens)
            .prop_map(|(input, output)| Event::ResponsesUsage { input, output }),
        1 => prop_oneof![
            Just("1e30".to_string()),
            Just("-1".to_string()),
            Just("18446744073709551616".to_string()),
            "[0-9]{21,40}",
        ]
        .prop_map(Event::OutOfRangeUsage),
        1 => "[^\r\n]{0,20}".prop_map(Event::Comment),
        1 => Just(Event::Done),
    ]
}

/// A stream's text, with `\n` or `\r\n` line ends.
fn stream() -> impl Strategy<Value = (Vec<Event>, Vec<u8>)> {
    (vec(event(), 0..12), any::<bool>()).prop_map(|(events, crlf)| {
        let newline = if crlf { "\r\n" } else { "\n" };
        let text: String = events.iter().map(|e| e.text(newline)).collect();
        (events, text.into_bytes())
    })
}

/// `bytes` cut at `cuts` (any points, repeats and all) into frames.
fn frames(bytes: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| bytes[w[0]..w[1]].to_vec())
        .collect()
}

fn tap(sse: bool, frames: &[Vec<u8>]) -> UsageTap {
    let mut tap = UsageTap::new(sse);
    for frame in frames {
        tap.observe(frame);
    }
    tap
}

/// What the tap should report for `events`: the last usage, and the distinct finish reasons.
fn expected(events: &[Event]) -> (Option<Usage>, Vec<String>) {
    let mut usage = None;
    let mut reasons: Vec<String> = Vec::new();
    for event in events {
        match event {
            Event::Usage { prompt, completion } => {
                usage = Some(Usage {
                    prompt_tokens: *prompt,
                    completion_tokens: *completion,
                    ..Default::default()
                })
            }
            Event::ResponsesUsage { input, output } => {
                usage = Some(Usage {
                    prompt_tokens: *input,
                    completion_tokens: *output,
                    ..Default::default()
                })
            }
            Event::Finish(reason) if !reasons.iter().any(|r| r == reason) => {
                reasons.push(reason.to_string())
            }
            _ => {}
        }
    }
    (usage, reasons)
}

/// A non-streamed completion: usage at the end, after a body of any size.
fn json_body() -> impl Strategy<Value = (Vec<u8>, Usage, &'static str)> {
    (
        any::<String>(),
        0usize..20_000,
        any::<u64>(),
        any::<u64>(),
        prop::sample::select(FINISH_REASONS),
    )
        .prop_map(|(content, padding, prompt, completion, reason)| {
            let body = serde_json::json!({
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"content": content + &"x".repeat(padding)}, "finish_reason": reason}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt.saturating_add(completion)},
            });
            let usage = Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
..Default::default()
            };
            (body.to_string().into_bytes(), usage, reason)
        })
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn a_stream_reads_the_same_however_it_is_cut(
        (events, bytes) in stream(),
        cuts in vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let whole = tap(true, std::slice::from_ref(&bytes));
        let cut = tap(true, &frames(&bytes, &cuts));
        prop_assert_eq!(cut.usage(), whole.usage());
        prop_assert_eq!(cut.finish_reasons(), whole.finish_reasons());
        prop_assert_eq!(cut.streamed_chunks(), whole.streamed_chunks());

        let (usage, reasons) = expected(&events);
        prop_assert_eq!(whole.usage(), usage);
        prop_assert_eq!(whole.finish_reasons(), reasons);
        if let Some(usage) = whole.usage() {
            prop_assert_eq!(usage.total(), usage.prompt_tokens.saturating_add(usage.completion_tokens));
        }
    }

    #[test]
    fn a_json_body_reads_the_same_however_it_is_cut(
        (bytes, usage, reason) in json_body(),
        cuts in vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let whole = tap(false, std::slice::from_ref(&bytes));
        let cut = tap(false, &frames(&bytes, &cuts));
        prop_assert_eq!(cut.usage(), whole.usage());
        prop_assert_eq!(cut.finish_reasons(), whole.finish_reasons());
        prop_assert_eq!(whole.usage(), Some(usage));
        // The tail kept for usage may not reach back to `finish_reason` in a long body.
        let reasons = whole.finish_reasons();
        prop_assert!(reasons.is_empty() || reasons == [reason]);
    }

    #[test]
    fn any_bytes_in_any_frames_never_panic(
        bytes in vec(any::<u8>(), 0..2048),
        cuts in vec(any::<prop::sample::Index>(), 0..16),
        sse in any::<bool>(),
    ) {
        let tap = tap(sse, &frames(&bytes, &cuts));
        if let Some(usage) = tap.usage() {
            let _ = usage.total();
        }
        let _ = tap.finish_reasons();
        let _ = tap.streamed_chunks();
    }

    #[test]
    fn sse_shaped_noise_never_panics(
        lines in vec(
            prop_oneof![
                "data: ?\\{\"usage\":\\{\"prompt_tokens\":[0-9e.+-]{1,30},\"total_tokens\":[0-9e.+-]{1,30}\\}\\}",
                "data: ?\\{\"finish_reason\": ?\"[^\"]{0,40}\"?",
                "data:[^\n]{0,60}",
                "(event|id|retry): [^\n]{0,20}",
            ],
            0..20,
        ),
        cuts in vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let bytes = lines.join("\n").into_bytes();
        let whole = tap(true, std::slice::from_ref(&bytes));
        let cut = tap(true, &frames(&bytes, &cuts));
        prop_assert_eq!(cut.usage(), whole.usage());
        prop_assert_eq!(cut.finish_reasons(), whole.finish_reasons());
    }
}

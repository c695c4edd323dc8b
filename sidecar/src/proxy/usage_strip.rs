//! When an app streams without `stream_options.include_usage`, the sidecar asks the upstream
//! for usage anyway (token accounting, limits and cost need it; estimates were off by 70%
//! on servers with chat templates) and takes the extra usage-only chunk back out of the
//! stream, so the app receives the events it asked for.
//!
//! Events are handed on line by line as they arrive: only a line not yet ended by its
//! newline is held until the rest of it comes, which an SSE reader would wait for anyway.

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;

/// A line longer than this is no usage chunk: it is passed on as it is, and the stream is
/// no longer filtered, so that an upstream sending no newlines is not held in memory.
const MAX_HELD_LINE: usize = 1024 * 1024;

#[derive(Default)]
pub struct UsageChunkStripper {
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// The blank line that ended a removed event is removed too.
    drop_blank: bool,
    gave_up: bool,
}

impl UsageChunkStripper {
    /// True when nothing is held back.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    pub fn filter(&mut self, data: Bytes) -> Bytes {
        if self.gave_up {
            return data;
        }
        if self.partial.len().saturating_add(data.len()) > MAX_HELD_LINE && !data.contains(&b'\n') {
            self.gave_up = true;
            let mut out = std::mem::take(&mut self.partial);
            out.extend_from_slice(&data);
            return Bytes::from(out);
        }
        let clean = self.partial.is_empty()
            && !self.drop_blank
            && data.last() == Some(&b'\n')
            && !has_usage_object(&data);
        if clean {
            return data;
        }
        let mut out = Vec::with_capacity(self.partial.len() + data.len());
        let mut pending = std::mem::take(&mut self.partial);
        pending.extend_from_slice(&data);
        let mut rest = pending.as_slice();
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(newline + 1);
            rest = after;
            let content = line.strip_suffix(b"\n").unwrap_or(line);
            let content = content.strip_suffix(b"\r").unwrap_or(content);
            if self.drop_blank && content.is_empty() {
                self.drop_blank = false;
                continue;
            }
            self.drop_blank = false;
            if is_usage_only_event(content) {
                self.drop_blank = true;
                continue;
            }
            out.extend_from_slice(line);
        }
        self.partial = rest.to_vec();
        Bytes::from(out)
    }

    /// A last line without its newline, at the end of the stream.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.partial.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.partial)))
    }
}

fn has_usage_object(data: &[u8]) -> bool {
    super::usage::USAGE_KEY.find_iter(data).any(|at| {
        let after = data[at + b"\"usage\"".len()..].trim_ascii_start();
        let value = after.strip_prefix(b":").unwrap_or(after).trim_ascii_start();
        value.first() == Some(&b'{')
    })
}

/// `data: {"choices": [], "usage": {...}, ...}`: the chunk that only the request for usage
/// brought.
fn is_usage_only_event(line: &[u8]) -> bool {
    let Some(payload) = line.strip_prefix(b"data:") else {
        return false;
    };
    if !has_usage_object(payload) {
        return false;
    }
    #[derive(Deserialize)]
    struct Chunk {
        choices: Vec<IgnoredAny>,
        usage: Option<IgnoredAny>,
    }
    serde_json::from_slice::<Chunk>(payload.trim_ascii())
        .is_ok_and(|chunk| chunk.choices.is_empty() && chunk.usage.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::cut_at;
    use proptest::prelude::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":34,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    );
    const EXPECTED: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: [DONE]\n\n",
    );

    fn through(pieces: &[&[u8]]) -> Vec<u8> {
        let mut stripper = UsageChunkStripper::default();
        let mut out = Vec::new();
        for piece in pieces {
            out.extend_from_slice(&stripper.filter(Bytes::copy_from_slice(piece)));
        }
        if let Some(rest) = stripper.finish() {
            out.extend_from_slice(&rest);
        }
        out
    }

    #[test]
    fn the_usage_only_chunk_is_removed_and_nothing_else() {
        assert_eq!(
            String::from_utf8(through(&[STREAM.as_bytes()])).unwrap(),
            EXPECTED
        );
    }

    #[test]
    fn a_line_without_end_is_not_held_forever() {
        let mut stripper = UsageChunkStripper::default();
        let long = vec![b'x'; MAX_HELD_LINE];
        assert!(stripper.filter(Bytes::from(long.clone())).is_empty());
        assert_eq!(
            stripper.filter(Bytes::from_static(b"yz")).len(),
            MAX_HELD_LINE + 2
        );
        assert!(stripper.is_empty());
        assert_eq!(
            stripper.filter(Bytes::from_static(b"rest")).as_ref(),
            b"rest"
        );
    }

    #[test]
    fn a_chunk_with_choices_and_usage_stays() {
        let stream = "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        assert_eq!(through(&[stream.as_bytes()]), stream.as_bytes());
    }

    #[test]
    fn ordinary_frames_pass_without_a_copy() {
        let frame =
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        let mut stripper = UsageChunkStripper::default();
        let out = stripper.filter(frame.clone());
        assert_eq!(out.as_ptr(), frame.as_ptr());
    }

    proptest! {
        #[test]
        fn any_cut_of_the_stream_gives_the_same_events(cuts in prop::collection::vec(0usize..STREAM.len(), 0..10)) {
            let pieces = cut_at(STREAM.as_bytes(), &cuts);
            prop_assert_eq!(String::from_utf8(through(&pieces)).unwrap(), EXPECTED);
        }
    }
}

//! Keeps an endpoint's key out of what an upstream sends back. A provider, or a proxy in
//! front of one, may echo the `Authorization` it received: in an error message, in
//! `www-authenticate`, in a debug header. The sidecar knows the exact key bytes, so it masks
//! every occurrence with `*` before the app sees it (the Bearer form contains the raw key,
//! so masking the key covers both).
//!
//! A mask has the key's length, so a body's `content-length` stays true. In a body that
//! arrives in pieces, only a piece's tail that could be the start of the key is held back
//! until the next piece shows whether it is; everything else passes at once, so streams are
//! not delayed.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use memchr::memmem::Finder;

/// A held-back tail at least this long is masked when the body ends there: the body ended
/// on a long prefix of the key, which is as telling as the key itself.
const MASKED_TRAILING_PREFIX: usize = 8;

const MASK: u8 = b'*';

/// Shorter keys are not masked: a placeholder like `ollama` or `json` is also ordinary text
/// (and header values such as `application/json`), which masking would corrupt. Real
/// providers' keys are far longer (OpenAI's 50+, Azure's 32, Anthropic's 100+ characters).
pub const MIN_MASKED_KEY_LEN: usize = 12;

/// One key, ready to be searched for.
pub struct KeyPattern {
    finder: Finder<'static>,
}

impl std::fmt::Debug for KeyPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyPattern(..)")
    }
}

impl KeyPattern {
    pub fn new(key: &[u8]) -> Self {
        let searched = if key.len() >= MIN_MASKED_KEY_LEN {
            key
        } else {
            b""
        };
        Self {
            finder: Finder::new(searched).into_owned(),
        }
    }

    /// False for a key too short to mask (see [`MIN_MASKED_KEY_LEN`]).
    pub fn masks_anything(&self) -> bool {
        !self.key().is_empty()
    }

    fn key(&self) -> &[u8] {
        self.finder.needle()
    }

    fn contains(&self, haystack: &[u8]) -> bool {
        !self.key().is_empty() && self.finder.find(haystack).is_some()
    }

    /// Masks every occurrence; true if there was one.
    fn mask_in_place(&self, buf: &mut [u8]) -> bool {
        let len = self.key().len();
        if len == 0 {
            return false;
        }
        let mut found = false;
        let mut from = 0;
        while let Some(at) = buf.get(from..).and_then(|rest| self.finder.find(rest)) {
            let start = from + at;
            buf[start..start + len].fill(MASK);
            found = true;
            from = start + len;
        }
        found
    }

    /// The length of the longest tail of `data` that is the start of the key (but not all
    /// of it): what may continue into the key in the next piece.
    fn partial_tail(&self, data: &[u8]) -> usize {
        let key = self.key();
        let Some(&first) = key.first() else {
            return 0;
        };
        let window = key.len().saturating_sub(1).min(data.len());
        let start = data.len() - window;
        memchr::memchr_iter(first, &data[start..])
            .map(|at| start + at)
            .find(|&at| key.starts_with(&data[at..]))
            .map_or(0, |at| data.len() - at)
    }

    /// Masks the key in every header value that holds it.
    pub fn redact_headers(&self, headers: &mut HeaderMap) {
        for value in headers.values_mut() {
            if self.contains(value.as_bytes()) {
                let mut bytes = value.as_bytes().to_vec();
                self.mask_in_place(&mut bytes);
                if let Ok(masked) = HeaderValue::from_bytes(&bytes) {
                    *value = masked;
                }
            }
        }
    }
}

/// Masks a key in a body that arrives in pieces.
pub struct BodyRedactor {
    pattern: Arc<KeyPattern>,
    held: Vec<u8>,
}

impl BodyRedactor {
    pub fn new(pattern: Arc<KeyPattern>) -> Self {
        Self {
            pattern,
            held: Vec::new(),
        }
    }

    /// The part of `data` (after what was held back before) that can go to the app now.
    pub fn filter(&mut self, data: Bytes) -> Bytes {
        let pattern = &self.pattern;
        if self.held.is_empty() && !pattern.contains(&data) && pattern.partial_tail(&data) == 0 {
            return data;
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(&data);
        pattern.mask_in_place(&mut buf);
        let keep = pattern.partial_tail(&buf);
        self.held = buf.split_off(buf.len() - keep);
        Bytes::from(buf)
    }

    pub fn pattern(&self) -> &KeyPattern {
        &self.pattern
    }

    /// True when nothing is held back.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// A whole body at once: what `filter` and `finish` would give for it.
    pub fn whole(mut self, body: Bytes) -> Bytes {
        let passed = self.filter(body);
        match self.finish() {
            None => passed,
            Some(rest) => {
                let mut all = passed.to_vec();
                all.extend_from_slice(&rest);
                Bytes::from(all)
            }
        }
    }

    /// What was held back, at the body's clean end.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.held.is_empty() {
            return None;
        }
        let mut rest = std::mem::take(&mut self.held);
        if rest.len() >= MASKED_TRAILING_PREFIX {
            rest.fill(MASK);
        }
        Some(Bytes::from(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::cut_at;
    use proptest::prelude::*;

    const KEY: &str = "sk-proj-0123456789abcdefXYZ";

    fn pattern() -> Arc<KeyPattern> {
        Arc::new(KeyPattern::new(KEY.as_bytes()))
    }

    fn through(pieces: &[&[u8]]) -> (Vec<u8>, Vec<Bytes>) {
        let mut redactor = BodyRedactor::new(pattern());
        let mut out = Vec::new();
        let mut frames = Vec::new();
        for piece in pieces {
            let passed = redactor.filter(Bytes::copy_from_slice(piece));
            out.extend_from_slice(&passed);
            frames.push(passed);
        }
        if let Some(rest) = redactor.finish() {
            out.extend_from_slice(&rest);
        }
        (out, frames)
    }

    #[test]
    fn a_body_without_the_key_passes_untouched_and_undelayed() {
        let body = br#"{"choices":[{"message":{"content":"sk- is how keys start"}}]}"#;
        let (out, frames) = through(&[body]);
        assert_eq!(out, body);
        assert_eq!(frames[0].as_ref(), body);
    }

    #[test]
    fn the_key_and_its_bearer_form_are_masked_keeping_the_length() {
        let body = format!(
            r#"{{"error":{{"message":"Incorrect API key provided: {KEY}","param":"Bearer {KEY}"}}}}"#
        );
        let (out, _) = through(&[body.as_bytes()]);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains(KEY));
        assert_eq!(out.len(), body.len());
        assert!(out.contains(&"*".repeat(KEY.len())));
    }

    #[test]
    fn a_key_split_across_pieces_is_caught() {
        let event = format!("data: {{\"delta\":\"leaked {KEY} here\"}}\n\n");
        for split in 1..event.len() {
            let (head, tail) = event.as_bytes().split_at(split);
            let (out, _) = through(&[head, tail]);
            assert!(
                !String::from_utf8_lossy(&out).contains(KEY),
                "split at {split}"
            );
            assert_eq!(out.len(), event.len());
        }
    }

    #[test]
    fn only_a_possible_start_of_the_key_is_held_back() {
        let mut redactor = BodyRedactor::new(pattern());
        assert_eq!(
            redactor.filter(Bytes::from_static(b"hello sk-pr")).as_ref(),
            b"hello "
        );
        assert_eq!(
            redactor.filter(Bytes::from_static(b"ivate")).as_ref(),
            b"sk-private"
        );
        assert_eq!(redactor.finish(), None);
    }

    #[test]
    fn a_whole_body_is_masked_as_a_stream_of_it_would_be() {
        let body = format!("key {KEY} then sk-proj-0123");
        let whole = BodyRedactor::new(pattern()).whole(Bytes::from(body.clone()));
        assert_eq!(whole, through(&[body.as_bytes()]).0);
    }

    #[test]
    fn a_body_ending_on_a_long_prefix_of_the_key_masks_it() {
        let (out, _) = through(&[b"tail: sk-proj-0123"]);
        assert_eq!(out, b"tail: ************");
        let (out, _) = through(&[b"tail: sk-"]);
        assert_eq!(out, b"tail: sk-");
    }

    #[test]
    fn a_key_too_short_to_tell_from_text_is_left_alone() {
        let pattern = Arc::new(KeyPattern::new(b"json"));
        assert!(!pattern.masks_anything());
        let mut redactor = BodyRedactor::new(Arc::clone(&pattern));
        let body = Bytes::from_static(b"{\"type\":\"json\"}");
        assert_eq!(redactor.filter(body.clone()), body);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        pattern.redact_headers(&mut headers);
        assert_eq!(headers["content-type"], "application/json");
    }

    #[test]
    fn headers_holding_the_key_are_masked() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "www-authenticate",
            HeaderValue::from_str(&format!("Bearer error=\"invalid_token\" token=\"{KEY}\""))
                .unwrap(),
        );
        headers.insert(
            "x-echo",
            HeaderValue::from_str(&format!("Bearer {KEY}")).unwrap(),
        );
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        pattern().redact_headers(&mut headers);
        for value in headers.values() {
            assert!(!String::from_utf8_lossy(value.as_bytes()).contains(KEY));
        }
        assert_eq!(headers["content-type"], "application/json");
    }

    proptest! {
        /// However a body is cut into pieces, the key never comes out whole, nothing else
        /// changes, and no byte is lost.
        #[test]
        fn no_cut_lets_the_key_through(
            prefix in "[ -~]{0,40}",
            suffix in "[ -~]{0,40}",
            copies in 0usize..3,
            cuts in prop::collection::vec(0usize..200, 0..8),
        ) {
            let mut body = prefix.clone();
            for _ in 0..copies {
                body.push_str(KEY);
                body.push_str(&suffix);
            }
            let bytes = body.as_bytes();
            let pieces = cut_at(bytes, &cuts);
            let (out, _) = through(&pieces);
            prop_assert_eq!(out.len(), bytes.len());
            prop_assert!(!String::from_utf8_lossy(&out).contains(KEY));
            if copies == 0 && !body.contains("sk-proj-") {
                prop_assert_eq!(out, bytes.to_vec());
            }
        }
    }
}

//! The app's path is appended to the endpoint's base URL and sent with the endpoint's key,
//! so a path that a server (or a proxy in front of it) would normalise into another place
//! must never leave the sidecar: `/v1/../../admin` would reach `/admin` with the key
//! attached. Dot segments, raw or percent-encoded, and empty segments are refused; so are
//! encoded slashes and backslashes, which some servers decode into separators and which no
//! OpenAI path or object id contains.

/// Why an API path was refused; the message is for the app, in a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("it contains a '.' or '..' segment")]
    DotSegment,
    #[error("it contains an empty segment ('//')")]
    EmptySegment,
    #[error("it contains an encoded '/' or '\\'")]
    EncodedSeparator,
    #[error("it contains a '\\'")]
    Backslash,
}

/// Checks `api_path` (the part after `/v1`, starting with `/`). A single trailing slash is
/// allowed: it cannot change which resource is meant.
pub fn check(api_path: &str) -> Result<(), PathError> {
    let Some(rest) = api_path.strip_prefix('/') else {
        return Err(PathError::EmptySegment);
    };
    if rest.is_empty() {
        return Ok(());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('\\') {
        return Err(PathError::Backslash);
    }
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(PathError::EmptySegment);
        }
        if !segment.contains('%') {
            if segment == "." || segment == ".." {
                return Err(PathError::DotSegment);
            }
            continue;
        }
        let decoded = percent_decoded(segment);
        if decoded.contains(&b'/') || decoded.contains(&b'\\') {
            return Err(PathError::EncodedSeparator);
        }
        if decoded == b"." || decoded == b".." {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

/// One level of percent-decoding, as a server would apply it; a malformed escape is kept
/// as it is.
fn percent_decoded(segment: &str) -> Vec<u8> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match (bytes.get(i), bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(b'%'), Some(&high), Some(&low)) => hex(high).zip(hex(low)),
            _ => None,
        };
        match escaped {
            Some((high, low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_api_paths_pass() {
        for ok in [
            "/chat/completions",
            "/models/gpt-4o",
            "/models/ft%3Agpt-4o%3Aorg",
            "/files/file-abc/content",
            "/threads/thread_1/runs/run_2/steps",
            "/models/",
            "/",
            "/a.b/c..d/...",
            "/100%",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn traversal_in_every_spelling_is_refused() {
        for (bad, why) in [
            ("/../../admin", PathError::DotSegment),
            ("/./models", PathError::DotSegment),
            ("/models/..", PathError::DotSegment),
            ("/%2e%2e/%2e%2e/admin", PathError::DotSegment),
            ("/%2E%2E/admin", PathError::DotSegment),
            ("/.%2e/admin", PathError::DotSegment),
            ("/%2e/admin", PathError::DotSegment),
            ("//evil/x", PathError::EmptySegment),
            ("//", PathError::EmptySegment),
            ("/models//x", PathError::EmptySegment),
            ("/files/a%2f..%2fb", PathError::EncodedSeparator),
            ("/files/%5c..", PathError::EncodedSeparator),
            ("/files/..\\admin", PathError::Backslash),
            ("", PathError::EmptySegment),
        ] {
            assert_eq!(check(bad), Err(why), "{bad}");
        }
    }

    proptest! {
        /// Whatever the app sends, a path that passes has no segment that a server would
        /// resolve upwards, even after one more round of decoding.
        #[test]
        fn nothing_that_passes_can_climb(segments in prop::collection::vec("[a-zA-Z0-9._%/\\\\-]{0,8}", 0..6)) {
            let path = format!("/{}", segments.join("/"));
            if check(&path).is_ok() {
                let trimmed = path.strip_suffix('/').unwrap_or(&path);
                for segment in trimmed.split('/').skip(1) {
                    let decoded = percent_decoded(segment);
                    prop_assert!(!decoded.is_empty());
                    prop_assert!(decoded != b"." && decoded != b"..");
                    prop_assert!(!decoded.contains(&b'/') && !decoded.contains(&b'\\'));
                }
            }
        }
    }
}

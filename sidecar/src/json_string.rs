//! A `&str` written as a JSON string literal, escaped exactly as `serde_json` escapes it, into
//! whichever buffer the writer builds: the request log line, span fields, a rewritten body.
//! Ids, names and paths rarely need an escape, so the common case is one scan and one copy,
//! where `serde_json`'s writer looks each byte up and writes through `io::Write`.

/// A buffer that JSON text is appended to.
pub trait JsonBuffer {
    fn push_text(&mut self, text: &str);
}

impl JsonBuffer for String {
    fn push_text(&mut self, text: &str) {
        self.push_str(text);
    }
}

impl JsonBuffer for Vec<u8> {
    fn push_text(&mut self, text: &str) {
        self.extend_from_slice(text.as_bytes());
    }
}

pub fn push_json_string<B: JsonBuffer>(out: &mut B, text: &str) {
    // A fold rather than `any`: with no early exit the compiler checks a vector of bytes
    // per instruction, which for the short strings of a log line is most of the cost.
    if !text
        .bytes()
        .fold(false, |found, byte| found | needs_escape(byte))
    {
        out.push_text("\"");
        out.push_text(text);
        out.push_text("\"");
        return;
    }
    out.push_text("\"");
    let mut copied = 0;
    for (at, byte) in text.bytes().enumerate() {
        if !needs_escape(byte) {
            continue;
        }
        // Escaped bytes are all ASCII, so `at` is a character boundary.
        out.push_text(text.get(copied..at).unwrap_or_default());
        match byte {
            b'"' => out.push_text("\\\""),
            b'\\' => out.push_text("\\\\"),
            b'\n' => out.push_text("\\n"),
            b'\r' => out.push_text("\\r"),
            b'\t' => out.push_text("\\t"),
            0x08 => out.push_text("\\b"),
            0x0c => out.push_text("\\f"),
            control => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let digits = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(control >> 4)],
                    HEX[usize::from(control & 0x0f)],
                ];
                out.push_text(std::str::from_utf8(&digits).unwrap_or_default());
            }
        }
        copied = at + 1;
    }
    out.push_text(text.get(copied..).unwrap_or_default());
    out.push_text("\"");
}

pub fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them_into_either_buffer() {
        let mut samples: Vec<String> = [
            "plain",
            "quote \" and backslash \\",
            "controls \n\r\t\u{08}\u{0c} and DEL \u{7f}",
            "unicode é ✓ 🦀 then \"",
            "",
        ]
        .map(String::from)
        .into();
        samples.extend((0u8..0x20).map(|c| format!("a{}b", char::from(c))));
        for sample in &samples {
            let expected = serde_json::to_string(sample).unwrap();
            let mut text = String::new();
            push_json_string(&mut text, sample);
            assert_eq!(text, expected);
            let mut bytes = Vec::new();
            push_json_string(&mut bytes, sample);
            assert_eq!(bytes, expected.as_bytes());
        }
    }
}

//! The fast path of [`super::RequestJson::parse`]: a JSON object's top-level members, found and
//! checked in one pass, strings skipped with a SIMD search for their closing quote.
//!
//! serde_json's reader checks a string a byte or a word at a time, and in the split of a
//! request body that was the largest single cost of admitting it. This scan accepts only
//! what serde_json accepts (RFC 8259, a top-level object, nothing after it) and splits it as
//! serde_json does; where it cannot vouch for a body (bad syntax, nesting deeper than it
//! tracks, a key it cannot decode), it answers `None` and serde_json reads the body instead,
//! so that its errors read as serde_json's. (A body that is not UTF-8 is refused before
//! either reads it, as malformed JSON.) A property test holds the two to the same answers.

use std::borrow::Cow;

/// Containers nested deeper than this are left to serde_json (which has no limit here).
const MAX_TRACKED_DEPTH: u32 = 128;

/// The top-level members of `text` (key, raw value text), in order, duplicates kept; `None`
/// if `text` is not a JSON object this scan can vouch for.
pub(super) fn object_members(text: &str) -> Option<Vec<(Cow<'_, str>, &str)>> {
    let mut scan = Scan { text, pos: 0 };
    scan.skip_whitespace();
    scan.byte(b'{')?;
    let mut members = Vec::with_capacity(8);
    scan.skip_whitespace();
    if scan.peek() == Some(b'}') {
        scan.pos += 1;
    } else {
        loop {
            scan.skip_whitespace();
            let key = scan.key()?;
            scan.skip_whitespace();
            scan.byte(b':')?;
            scan.skip_whitespace();
            let start = scan.pos;
            scan.value()?;
            members.push((key, text.get(start..scan.pos)?));
            scan.skip_whitespace();
            match scan.next()? {
                b',' => {}
                b'}' => break,
                _ => return None,
            }
        }
    }
    scan.skip_whitespace();
    (scan.pos == text.len()).then_some(members)
}

/// Strings up to this long (keys, roles, model names: most of a body's strings) are looked
/// through byte by byte; a SIMD search costs more than that to get going.
const SHORT_STRING: usize = 16;

/// How many string characters start `rest`, up to its first `"` or `\`; `None` if there is
/// none, or if a control character (which JSON forbids in a string) comes first. The text
/// was checked as UTF-8 whole.
fn string_run(rest: &[u8]) -> Option<usize> {
    for (at, &byte) in rest.iter().take(SHORT_STRING).enumerate() {
        match byte {
            b'"' | b'\\' => return Some(at),
            0..0x20 => return None,
            _ => {}
        }
    }
    let at = memchr::memchr2(b'"', b'\\', rest)?;
    // `min` over the run compiles to vector instructions, unlike an early-exit search.
    let run = rest.get(..at)?;
    (run.iter().copied().min().unwrap_or(b' ') >= 0x20).then_some(at)
}

struct Scan<'t> {
    text: &'t str,
    pos: usize,
}

impl<'t> Scan<'t> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn byte(&mut self, expected: u8) -> Option<()> {
        (self.next()? == expected).then_some(())
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.pos += 1;
        }
    }

    /// A member's name, borrowed unless it has escapes (then decoded by serde_json, which
    /// also refuses a lone surrogate as it would in its own split).
    fn key(&mut self) -> Option<Cow<'t, str>> {
        let start = self.pos;
        let escaped = self.string()?;
        let literal = self.text.get(start..self.pos)?;
        if escaped {
            serde_json::from_str(literal).ok()
        } else {
            literal
                .get(1..literal.len().checked_sub(1)?)
                .map(Cow::Borrowed)
        }
    }

    /// Steps over a string (the cursor at its opening quote); whether it has escapes.
    fn string(&mut self) -> Option<bool> {
        self.byte(b'"')?;
        let mut escaped = false;
        loop {
            let rest = self.text.as_bytes().get(self.pos..)?;
            let at = string_run(rest)?;
            self.pos += at;
            if self.next()? == b'"' {
                return Some(escaped);
            }
            escaped = true;
            match self.next()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                b'u' => {
                    for _ in 0..4 {
                        if !self.next()?.is_ascii_hexdigit() {
                            return None;
                        }
                    }
                }
                _ => return None,
            }
        }
    }

    /// Steps over any value, nested containers included, without recursion: the open
    /// containers are a stack of bits (set: an object), so a hostile body cannot exhaust
    /// the stack.
    fn value(&mut self) -> Option<()> {
        let mut open: u128 = 0;
        let mut depth: u32 = 0;
        loop {
            // At the start of a value.
            self.skip_whitespace();
            match self.peek()? {
                b'{' | b'[' => {
                    let object = self.next()? == b'{';
                    self.skip_whitespace();
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        // Empty: a complete value.
                        self.pos += 1;
                    } else {
                        if depth == MAX_TRACKED_DEPTH {
                            return None;
                        }
                        open = (open << 1) | u128::from(object);
                        depth += 1;
                        if object {
                            self.member_name()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.literal("true")?,
                b'f' => self.literal("false")?,
                b'n' => self.literal("null")?,
                _ => self.number()?,
            }
            // After a complete value: close containers until one continues, or the top
            // value has ended.
            loop {
                if depth == 0 {
                    return Some(());
                }
                let object = open & 1 == 1;
                self.skip_whitespace();
                match self.next()? {
                    b',' => {
                        if object {
                            self.member_name()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                open >>= 1;
                depth -= 1;
            }
        }
    }

    /// A nested member's name and its colon, up to its value.
    fn member_name(&mut self) -> Option<()> {
        self.skip_whitespace();
        self.string()?;
        self.skip_whitespace();
        self.byte(b':')
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        let end = self.pos.checked_add(word.len())?;
        (self.text.get(self.pos..end)? == word).then(|| self.pos = end)
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }
}

//! Server-Sent Events, read and written for stream translation: events are parsed as their
//! bytes arrive (an event split across reads is put back together, nothing else is held)
//! and each translated event is written out as soon as the upstream's event is complete.

/// An upstream event longer than this is refused: no event of either API comes near it, and
/// an upstream that never ends its event must not grow the sidecar's memory.
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// One complete event. `data` lines are joined by `\n`, as the SSE spec says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, if the event has one (Anthropic names every event; OpenAI none).
    pub name: Option<&'a str>,
    pub data: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an upstream event is longer than {MAX_EVENT_BYTES} bytes")]
    EventTooLarge,
}

/// Splits a byte stream into events.
#[derive(Default)]
pub struct SseParser {
    /// The start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// The line before ended in `\r`: a `\n` starting the next read belongs to it.
    after_cr: bool,
    name: Option<String>,
    data: String,
    has_data: bool,
    /// Bytes of the event being assembled, for the size bound.
    event_bytes: usize,
}

impl SseParser {
    /// Feeds the next bytes of the stream; `on_event` is called for each event they complete.
    pub fn push(
        &mut self,
        mut bytes: &[u8],
        on_event: &mut dyn FnMut(SseEvent<'_>),
    ) -> Result<(), SseError> {
        if std::mem::take(&mut self.after_cr) && bytes.first() == Some(&b'\n') {
            bytes = &bytes[1..];
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, rest) = bytes.split_at(end);
            let crlf = rest.starts_with(b"\r\n");
            if rest.len() == 1 && rest[0] == b'\r' {
                self.after_cr = true;
            }
            bytes = &rest[if crlf { 2 } else { 1 }..];
            self.grow(head.len())?;
            if self.line.is_empty() {
                self.line_done(head, on_event);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.line_done(&line, on_event);
                line.clear();
                self.line = line;
            }
        }
        self.grow(bytes.len())?;
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// The stream ended: an event that lacked only its closing blank line is still given.
    pub fn finish(&mut self, on_event: &mut dyn FnMut(SseEvent<'_>)) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
        }
        self.line_done(b"", on_event);
    }

    fn grow(&mut self, by: usize) -> Result<(), SseError> {
        self.event_bytes = self.event_bytes.saturating_add(by);
        if self.event_bytes > MAX_EVENT_BYTES {
            return Err(SseError::EventTooLarge);
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut dyn FnMut(SseEvent<'_>)) {
        if line.is_empty() {
            if self.has_data {
                on_event(SseEvent {
                    name: self.name.as_deref(),
                    data: &self.data,
                });
            }
            self.name = None;
            self.data.clear();
            self.has_data = false;
            self.event_bytes = 0;
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.find(':') {
            Some(0) => return, // a comment
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(' ').unwrap_or(value))
            }
            None => (&*line, ""),
        };
        match field {
            "event" => self.name = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // id, retry and unknown fields mean nothing to a translation
        }
    }
}

/// Appends one event. `data` must hold no newline (compact JSON never does).
pub fn write_event(out: &mut Vec<u8>, name: Option<&str>, data: &[u8]) {
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
}

/// Appends one event whose data is `value` as compact JSON.
pub fn write_json_event(out: &mut Vec<u8>, name: Option<&str>, value: &serde_json::Value) {
    // Serializing a Value into a Vec cannot fail.
    let data = serde_json::to_vec(value).unwrap_or_default();
    write_event(out, name, &data);
}

/// Turns the events of one dialect into those of another, one upstream event at a time.
pub trait StreamTranslator: Send {
    /// One complete upstream event; the events it becomes are appended to `out` (possibly
    /// none: a `ping` or a chunk with nothing in it).
    fn event(&mut self, event: SseEvent<'_>, out: &mut Vec<u8>);
    /// The upstream's body ended (cleanly or not): whatever the app's dialect needs to close
    /// the stream and was not sent yet is appended (a stream cut short is not made to look
    /// complete: no closing events unless the upstream's own end was seen).
    fn finish(&mut self, out: &mut Vec<u8>);
    /// The upstream's stream reached its own end (`[DONE]`, `message_stop`).
    fn ended(&self) -> bool;
}

/// A parser and a translator: bytes of the upstream's stream in, bytes of the app's out.
pub struct TranslatingStream {
    parser: SseParser,
    translator: Box<dyn StreamTranslator>,
}

impl TranslatingStream {
    pub fn new(translator: Box<dyn StreamTranslator>) -> Self {
        Self {
            parser: SseParser::default(),
            translator,
        }
    }

    /// The translated events that `bytes` complete (often empty while an event is partial).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<u8>, SseError> {
        let mut out = Vec::new();
        let translator = &mut self.translator;
        self.parser
            .push(bytes, &mut |event| translator.event(event, &mut out))?;
        Ok(out)
    }

    /// The upstream body ended: the last events.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let translator = &mut self.translator;
        self.parser
            .finish(&mut |event| translator.event(event, &mut out));
        translator.finish(&mut out);
        out
    }

    pub fn ended(&self) -> bool {
        self.translator.ended()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<(Option<String>, String)> {
        let mut parser = SseParser::default();
        let mut seen = Vec::new();
        let mut on = |e: SseEvent<'_>| seen.push((e.name.map(str::to_string), e.data.to_string()));
        for chunk in chunks {
            parser.push(chunk, &mut on).unwrap();
        }
        parser.finish(&mut on);
        seen
    }

    #[test]
    fn named_and_unnamed_events_with_every_line_ending() {
        let stream: &[u8] = b"event: message_start\ndata: {\"a\":1}\n\n: comment\r\ndata: x\r\ndata: y\r\n\r\nid: 3\rdata:z\r\r";
        let expected = vec![
            (Some("message_start".to_string()), "{\"a\":1}".to_string()),
            (None, "x\ny".to_string()),
            (None, "z".to_string()),
        ];
        assert_eq!(events(&[stream]), expected);
        // Every split point gives the same events.
        for cut in 0..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(events(&[a, b]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn an_event_without_its_blank_line_is_given_at_the_end() {
        assert_eq!(
            events(&[b"data: [DONE]"]),
            vec![(None, "[DONE]".to_string())]
        );
        assert_eq!(events(&[b"event: ping\n\n"]), vec![]);
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut parser = SseParser::default();
        let big = vec![b'a'; MAX_EVENT_BYTES / 4];
        let mut result = Ok(());
        for _ in 0..5 {
            result = result.and_then(|()| parser.push(&big, &mut |_| {}));
        }
        assert_eq!(result, Err(SseError::EventTooLarge));
    }

    #[test]
    fn written_events_parse_back() {
        let mut out = Vec::new();
        write_json_event(
            &mut out,
            Some("content_block_delta"),
            &serde_json::json!({"t": "a\nb"}),
        );
        write_event(&mut out, None, b"[DONE]");
        assert_eq!(
            events(&[&out]),
            vec![
                (
                    Some("content_block_delta".to_string()),
                    r#"{"t":"a\nb"}"#.to_string()
                ),
                (None, "[DONE]".to_string())
            ]
        );
    }
}

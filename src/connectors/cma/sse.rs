//! The event stream's server-sent-events framing, with the rules the official
//! worker applies (contract §2.6): frames are separated by a blank line;
//! multiple `data:` lines join with `\n`; a frame without an `event:` field,
//! or with empty data, is dropped; `event: ping` is a keep-alive, not an
//! event; `event: error` is a stream error (reconnect); any other event name
//! carries one JSON event whose kind comes from its `type`. Data that is not
//! JSON is an error the caller treats as fatal for the stream.
//!
//! Bytes are buffered until a frame is complete, so a frame split anywhere
//! (even inside a UTF-8 sequence) parses the same.

use serde_json::Value;

/// One parsed frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A session event (the JSON payload).
    Event(Value),
    /// `event: ping`.
    Ping,
    /// `event: error`, with its payload (JSON if it parses).
    Error(Value),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SseError {
    #[error("event stream frame {event:?} carries data that is not JSON: {data:.200}")]
    NotJson { event: String, data: String },
    #[error("event stream frame over {0} bytes")]
    TooLarge(usize),
}

/// Largest frame accepted (a tool_use input can be large; 64 MiB, as the
/// sandbox protocol's messages).
pub const MAX_FRAME: usize = 64 << 20;

#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Feeds bytes; returns every frame completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let Some((end, sep)) = frame_end(&self.buf) else {
                if self.buf.len() > MAX_FRAME {
                    return Err(SseError::TooLarge(MAX_FRAME));
                }
                return Ok(out);
            };
            let raw: Vec<u8> = self.buf.drain(..end + sep).collect();
            if let Some(f) = parse_frame(&raw[..end])? {
                out.push(f);
            }
        }
    }
}

/// The end of the first complete frame: (index of the blank line, its length).
fn frame_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if buf[i] == b'\r' && buf[i + 1] == b'\n' && buf.get(i + 2..i + 4) == Some(b"\r\n") {
            return Some((i, 4));
        }
        if buf[i] == b'\r' && buf[i + 1] == b'\r' {
            return Some((i, 2));
        }
        i += 1;
    }
    None
}

fn parse_frame(raw: &[u8]) -> Result<Option<Frame>, SseError> {
    let text = String::from_utf8_lossy(raw);
    let mut event: Option<String> = None;
    let mut data: Vec<&str> = Vec::new();
    for line in text.split(['\n', '\r']).filter(|l| !l.is_empty()) {
        if line.starts_with(':') {
            continue; // comment
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event = Some(value.to_string()),
            "data" => data.push(value),
            _ => {} // id, retry: ignored, as the official worker does
        }
    }
    let Some(event) = event.filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    let data = data.join("\n");
    if event == "ping" {
        return Ok(Some(Frame::Ping));
    }
    if data.is_empty() {
        return Ok(None);
    }
    if event == "error" {
        let v = serde_json::from_str(&data).unwrap_or(Value::String(data));
        return Ok(Some(Frame::Error(v)));
    }
    match serde_json::from_str(&data) {
        Ok(v) => Ok(Some(Frame::Event(v))),
        Err(_) => Err(SseError::NotJson { event, data }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_follow_the_official_workers_rules() {
        let mut p = Parser::new();
        let input = concat!(
            "event: message\ndata: {\"type\":\"agent.tool_use\",\"id\":\"e1\"}\n\n",
            "data: {\"type\":\"dropped: no event field\"}\n\n",
            "event: ping\ndata: {}\n\n",
            ": a comment\n\n",
            "event: anything\nid: 7\nretry: 10\ndata: {\"a\":\n",
            "data: 1}\n\n",
            "event: message\ndata:\n\n",
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n",
        );
        let frames = p.push(input.as_bytes()).unwrap();
        assert_eq!(
            frames,
            vec![
                Frame::Event(json!({"type": "agent.tool_use", "id": "e1"})),
                Frame::Ping,
                Frame::Event(json!({"a": 1})),
                Frame::Error(json!({"type": "error", "error": {"type": "overloaded_error"}})),
            ]
        );
    }

    #[test]
    fn a_frame_split_anywhere_parses_the_same() {
        let input = "event: m\r\ndata: {\"t\":\"é\"}\r\n\r\nevent: m\ndata: {\"t\":2}\n\n";
        let whole = Parser::new().push(input.as_bytes()).unwrap();
        assert_eq!(whole.len(), 2);
        for cut in 1..input.len() {
            let mut p = Parser::new();
            let mut got = p.push(&input.as_bytes()[..cut]).unwrap();
            got.extend(p.push(&input.as_bytes()[cut..]).unwrap());
            assert_eq!(got, whole, "cut at {cut}");
        }
    }

    #[test]
    fn data_that_is_not_json_is_an_error() {
        let e = Parser::new()
            .push(b"event: m\ndata: {nope\n\n")
            .unwrap_err();
        assert!(matches!(e, SseError::NotJson { .. }));
    }
}

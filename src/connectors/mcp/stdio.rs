//! MCP over a byte stream (stdin and stdout for `hands mcp`): one JSON-RPC
//! message per line, as MCP's stdio transport frames them, with a framing
//! layer in front of the SDK that answers what the SDK would drop silently or
//! answer unclearly, and keeps serving:
//!
//! - a line that is not JSON gets a JSON-RPC parse error (`-32700`, id `null`)
//!   naming what is wrong;
//! - a line longer than [`MAX_LINE`] is read to its end and dropped, never held,
//!   and gets an invalid-request error (`-32600`) saying how long it was and what
//!   the limit is;
//! - a `tools/call` whose params are not an object with a string `name` and,
//!   if present, an object `arguments` gets an invalid-params error (`-32602`)
//!   with its id, instead of the SDK's `method not found`.
//!
//! Everything else passes through unchanged, in order.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// The longest message taken: the largest call input a session takes, plus
/// room for the JSON-RPC envelope and the escaping of the input's text.
pub const MAX_LINE: usize = crate::session::MAX_MESSAGE + (1 << 20);

/// What a line is, once looked at.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Pass it to the SDK.
    Pass,
    /// Nothing to do (a blank line).
    Skip,
    /// Answer with this JSON-RPC error response instead.
    Answer(serde_json::Value),
}

fn error(id: serde_json::Value, code: i64, message: String) -> serde_json::Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// Judges one complete line (without its newline).
pub fn judge(line: &[u8]) -> Verdict {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Verdict::Skip;
    }
    let msg: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Verdict::Answer(error(
                serde_json::Value::Null,
                -32700,
                format!("parse error: the message is not JSON ({e})"),
            ))
        }
    };
    let Some(obj) = msg.as_object() else {
        return Verdict::Answer(error(
            serde_json::Value::Null,
            -32600,
            "invalid request: a message must be a JSON object (batches are not part of MCP)"
                .to_string(),
        ));
    };
    if obj.get("method").and_then(|m| m.as_str()) == Some("tools/call") {
        if let Some(id) = obj.get("id") {
            let params = obj.get("params");
            let why = match params.and_then(|p| p.as_object()) {
                None => Some("params must be an object"),
                Some(p) => match (p.get("name"), p.get("arguments")) {
                    (
                        Some(serde_json::Value::String(_)),
                        None | Some(serde_json::Value::Object(_)),
                    ) => None,
                    (Some(serde_json::Value::String(_)), Some(_)) => {
                        Some("params.arguments must be an object (the tool's input)")
                    }
                    _ => Some("params.name must be the tool's name, a string"),
                },
            };
            if let Some(why) = why {
                return Verdict::Answer(error(id.clone(), -32602, format!("tools/call: {why}")));
            }
        }
    }
    Verdict::Pass
}

/// Reads lines from `input` and passes those the SDK should see to `to_sdk`;
/// the answers to the others go to `answers`. Returns at EOF of `input` (or
/// when the SDK side is gone), shutting `to_sdk` down so the SDK sees EOF too.
pub async fn pump_in<R, W>(input: R, mut to_sdk: W, answers: mpsc::Sender<Vec<u8>>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = BufReader::with_capacity(64 * 1024, input);
    let mut line: Vec<u8> = Vec::new();
    // Bytes of an over-long line seen so far, while it is being skipped.
    let mut skipping: Option<usize> = None;
    loop {
        let buf = match input.fill_buf().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("mcp: reading the client's messages: {e}");
                break;
            }
        };
        if buf.is_empty() {
            break; // EOF; an unterminated last line is not a message
        }
        let (chunk, complete) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if let Some(seen) = skipping.as_mut() {
            *seen += chunk.len();
        } else if line.len() + chunk.len() > MAX_LINE {
            skipping = Some(line.len() + chunk.len());
            line = Vec::new();
        } else {
            line.extend_from_slice(chunk);
        }
        let used = complete.unwrap_or(buf.len());
        input.consume(used);
        if complete.is_none() {
            continue;
        }
        let verdict = match skipping.take() {
            Some(len) => Verdict::Answer(error(
                serde_json::Value::Null,
                -32600,
                format!(
                    "invalid request: a message of {len} bytes or more is over the limit of \
                     {MAX_LINE} bytes; it was dropped"
                ),
            )),
            None => judge(&line),
        };
        match verdict {
            Verdict::Skip => {}
            Verdict::Pass => {
                line.push(b'\n');
                if to_sdk.write_all(&line).await.is_err() || to_sdk.flush().await.is_err() {
                    break;
                }
            }
            Verdict::Answer(v) => {
                let mut bytes = serde_json::to_vec(&v).expect("a JSON value serialises");
                bytes.push(b'\n');
                if answers.send(bytes).await.is_err() {
                    break;
                }
            }
        }
        line.clear();
        line.shrink_to(64 * 1024);
    }
    let _ = to_sdk.shutdown().await;
}

/// Writes the SDK's lines and the framing layer's answers to `output`, whole
/// lines at a time, until both are done.
pub async fn pump_out<R, W>(from_sdk: R, mut output: W, mut answers: mpsc::Receiver<Vec<u8>>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut from_sdk = BufReader::new(from_sdk);
    let mut line = Vec::new();
    let mut sdk_open = true;
    let mut answers_open = true;
    while sdk_open || answers_open {
        tokio::select! {
            n = from_sdk.read_until(b'\n', &mut line), if sdk_open => {
                match n {
                    Ok(0) | Err(_) => sdk_open = false,
                    Ok(_) => {
                        if output.write_all(&line).await.is_err() || output.flush().await.is_err() {
                            return;
                        }
                        line.clear();
                    }
                }
            }
            a = answers.recv(), if answers_open => match a {
                None => answers_open = false,
                Some(bytes) => {
                    if output.write_all(&bytes).await.is_err() || output.flush().await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(v: &Verdict) -> i64 {
        match v {
            Verdict::Answer(e) => e["error"]["code"].as_i64().unwrap(),
            other => panic!("no answer: {other:?}"),
        }
    }

    #[test]
    fn lines_are_judged() {
        assert_eq!(judge(b"  "), Verdict::Skip);
        assert_eq!(code(&judge(b"this is not json")), -32700);
        assert_eq!(code(&judge(b"[1, 2]")), -32600);
        assert_eq!(
            judge(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#),
            Verdict::Pass
        );
        let ok = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"bash","arguments":{"command":"true"}}}"#;
        assert_eq!(judge(ok), Verdict::Pass);
        let no_args = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"bash"}}"#;
        assert_eq!(judge(no_args), Verdict::Pass);
        for bad in [
            &br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"bash","arguments":"x"}}"#[..],
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":3}}"#,
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":[1]}"#,
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call"}"#,
        ] {
            let v = judge(bad);
            assert_eq!(code(&v), -32602);
            let Verdict::Answer(e) = v else { unreachable!() };
            assert_eq!(e["id"], 7);
        }
    }

    #[tokio::test]
    async fn an_over_long_line_is_dropped_with_an_answer_and_the_next_passes() {
        let mut input = vec![b'x'; MAX_LINE + 10];
        input
            .extend_from_slice(b"\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\nnot json\n");
        let (sdk_w, mut sdk_r) = tokio::io::duplex(1 << 16);
        let (tx, mut rx) = mpsc::channel(4);
        let pump = tokio::spawn(pump_in(std::io::Cursor::new(input), sdk_w, tx));
        let mut passed = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut sdk_r, &mut passed)
            .await
            .unwrap();
        pump.await.unwrap();
        assert_eq!(
            passed,
            "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n"
        );
        let first: serde_json::Value = serde_json::from_slice(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(first["error"]["code"], -32600);
        assert!(first["error"]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit"));
        let second: serde_json::Value = serde_json::from_slice(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(second["error"]["code"], -32700);
    }
}

//! The channel between the worker and a session's helper: length-prefixed JSON
//! frames over unix stream socketpairs (one each way), with pipe fds passed by SCM_RIGHTS.
//!
//! The helper is confined but runs code the agent can influence, so the worker
//! treats every frame from it as untrusted input: bounded size, strict parse, and
//! a malformed frame ends the session rather than the worker.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::landlock::{LandlockFeature, LandlockReport};
use crate::tools::{Tool, ToolResult};

/// Largest frame either side accepts (a 20 MiB PDF read is ~27 MiB of base64).
pub const MAX_FRAME: usize = 64 << 20;

/// Network shape of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// Own network namespace with `lo` up; landlock leaves TCP alone.
    Loopback,
    /// Own network namespace with no interface up; IPv4 and IPv6 sockets refused
    /// (seccomp), and landlock refuses every TCP bind/connect.
    None,
    /// Own network namespace with `lo` up and the egress barrier the worker
    /// installed before setup (see [`super::netfilter`]): TCP to other hosts
    /// reaches the worker's transparent listener, nothing else leaves `lo`;
    /// `/etc/resolv.conf` names the session resolver on 127.0.0.1.
    Egress,
}

/// Everything the helper needs to build and confine the session, sent as the
/// first frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub session_id: String,
    /// Host directory (empty, root-owned) on which the new root is assembled.
    pub root_dir: PathBuf,
    /// Host path of the workspace, mounted at `/workspace`.
    pub workspace: PathBuf,
    /// Owner of the workspace on the host; seen as the session uid inside through
    /// an idmapped mount.
    pub workspace_uid: u32,
    pub workspace_gid: u32,
    /// The session's unprivileged uid/gid.
    pub uid: u32,
    pub gid: u32,
    /// Host paths made visible read-only at the same place.
    pub read_only: Vec<PathBuf>,
    pub tmp_size: u64,
    pub net: NetMode,
    pub allow_degraded: Vec<LandlockFeature>,
    /// Accept a missing landlock right another layer covers (policy
    /// `sandbox.landlock = "covered"`).
    #[serde(default)]
    pub landlock_covered: bool,
    pub max_file_bytes: u64,
    pub output_limit: usize,
    /// Workspace subdirectories with extra treatment (the connector's memory
    /// stores), already created on the host.
    #[serde(default)]
    pub extra_dirs: Vec<ExtraDir>,
    /// The seccomp refusal of set-user-ID and set-group-ID modes is off. Only the
    /// escape suite sets it, to show that the host-side layer holds on its own
    /// (see [`super::Weakened`]).
    #[serde(default)]
    pub weakened_setid_guard: bool,
    /// The seccomp refusal of IPv4 and IPv6 sockets under `none` is off (the
    /// escape suite, to show landlock's TCP wall on its own).
    #[serde(default)]
    pub weakened_inet_guard: bool,
}

pub use crate::workspace::ExtraDir;

/// Worker → helper.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Run a file tool.
    /// Its input is the frame's payload: the client's JSON as it came (see
    /// [`encode_frame_with`]), parsed once, in the helper.
    Tool { id: u64, tool: Tool },
    /// Raise the cancel flag of a running file tool.
    Cancel { id: u64 },
    /// Start a process. Three fds travel with this frame: stdin, stdout, stderr.
    /// With `kill_all_on_exit`, when it exits every other process of the session
    /// is killed too (the shell's background jobs die with the shell).
    Spawn {
        id: u64,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
        kill_all_on_exit: bool,
    },
    /// Kill every process of the session except the helper, and wait until they
    /// are gone.
    KillAll { id: u64 },
}

/// Helper → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    /// Setup done; the helper is confined.
    Ready {
        report: ConfinementReport,
    },
    /// Setup failed at `stage`; the helper exits after sending this.
    SetupFailed {
        stage: String,
        error: String,
    },
    ToolDone {
        id: u64,
        result: ToolResult,
    },
    /// A file tool's result of one text block, the common case: the text is
    /// the frame's payload as UTF-8 bytes (see [`encode_result`]), not a JSON
    /// string with its escapes. The worker reads it as [`Response::ToolDone`].
    ToolText {
        id: u64,
        is_error: bool,
    },
    Spawned {
        id: u64,
        pid: i32,
    },
    SpawnFailed {
        id: u64,
        error: String,
        /// The errno of the failed exec (ENOENT: no such program), if any.
        #[serde(default)]
        errno: Option<i32>,
    },
    /// A spawned process ended: exit code, or 128 + signal number.
    Exited {
        pid: i32,
        status: i32,
    },
    Killed {
        id: u64,
        ok: bool,
    },
}

/// What the helper enforced, reported once at setup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfinementReport {
    pub landlock: LandlockReport,
    pub seccomp: bool,
    pub no_new_privs: bool,
    pub uid: u32,
    pub effective_caps: u64,
    pub idmapped_workspace: bool,
}

/// Writes one frame (blocking).
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::other(format!(
            "frame of {} bytes exceeds {MAX_FRAME}",
            body.len()
        )));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)
}

/// Encodes one frame into bytes (for async writers).
pub fn encode_frame<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    write_frame(&mut buf, msg)?;
    Ok(buf)
}

/// Encodes one frame whose body is `msg`'s JSON, a NUL byte (which JSON text
/// never holds), then `payload` as it is: a call's input travels without being
/// parsed and encoded again on the way.
pub fn encode_frame_with<T: Serialize>(msg: &T, payload: &[u8]) -> io::Result<Vec<u8>> {
    let header = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = header.len() + 1 + payload.len();
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.extend_from_slice(&header);
    buf.push(0);
    buf.extend_from_slice(payload);
    Ok(buf)
}

/// Encodes the answer to file tool call `id`: one text block as a
/// [`Response::ToolText`] header with the text as payload, anything else
/// (an image, a document) as [`Response::ToolDone`].
pub fn encode_result(id: u64, result: &ToolResult) -> io::Result<Vec<u8>> {
    match result.content.as_slice() {
        [crate::tools::ContentBlock::Text { text }] => encode_frame_with(
            &Response::ToolText {
                id,
                is_error: result.is_error,
            },
            text.as_bytes(),
        ),
        _ => encode_frame(&Response::ToolDone {
            id,
            result: result.clone(),
        }),
    }
}

/// Decodes one frame's body from the helper: its header, and for a
/// [`Response::ToolText`] the text payload, which must be UTF-8. A text result
/// comes out as [`Response::ToolDone`].
pub fn decode_response(mut body: Vec<u8>) -> Result<Response, String> {
    let Some(nul) = memchr::memchr(0, &body) else {
        return serde_json::from_slice(&body).map_err(|e| e.to_string());
    };
    let payload = body.split_off(nul + 1);
    body.truncate(nul);
    match serde_json::from_slice(&body).map_err(|e| e.to_string())? {
        Response::ToolText { id, is_error } => {
            let text = String::from_utf8(payload)
                .map_err(|e| format!("tool {id}: its text is not UTF-8: {e}"))?;
            Ok(Response::ToolDone {
                id,
                result: ToolResult {
                    content: vec![crate::tools::ContentBlock::Text { text }],
                    is_error,
                },
            })
        }
        other => Err(format!("a payload after a {other:?} frame")),
    }
}

/// Reads one frame (blocking) and its payload (empty when it has none);
/// `Ok(None)` on a clean EOF between frames.
pub fn read_frame_with<R: Read, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> io::Result<Option<(T, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let (header, payload) = match memchr::memchr(0, &body) {
        Some(i) => (&body[..i], body[i + 1..].to_vec()),
        None => (&body[..], Vec::new()),
    };
    serde_json::from_slice(header)
        .map(|m| Some((m, payload)))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads one frame (blocking); `Ok(None)` on a clean EOF between frames.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> io::Result<Option<T>> {
    Ok(read_frame_with(r)?.map(|(msg, _payload)| msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::ContentBlock;

    fn body(frame: Vec<u8>) -> Vec<u8> {
        frame[4..].to_vec()
    }

    #[test]
    fn a_text_result_travels_as_bytes_and_comes_back_whole() {
        let text = "line \"one\"\n\ttab, NUL \0 and é\n".repeat(100);
        let result = ToolResult {
            content: vec![ContentBlock::Text { text: text.clone() }],
            is_error: true,
        };
        let frame = encode_result(7, &result).unwrap();
        // The text is in the frame as it is, not as an escaped JSON string.
        assert!(frame.windows(text.len()).any(|w| w == text.as_bytes()));
        match decode_response(body(frame)).unwrap() {
            Response::ToolDone { id, result: back } => {
                assert_eq!(id, 7);
                assert_eq!(back, result);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_result_of_other_blocks_travels_as_json() {
        let result = ToolResult {
            content: vec![
                ContentBlock::Text { text: "a".into() },
                ContentBlock::Text { text: "b".into() },
            ],
            is_error: false,
        };
        let frame = encode_result(3, &result).unwrap();
        assert!(!frame[4..].contains(&0), "no payload separator");
        match decode_response(body(frame)).unwrap() {
            Response::ToolDone {
                id: 3,
                result: back,
            } => assert_eq!(back, result),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_text_payload_that_is_not_utf8_is_a_protocol_error() {
        let mut frame = encode_frame_with(
            &Response::ToolText {
                id: 1,
                is_error: false,
            },
            b"ok",
        )
        .unwrap();
        let n = frame.len();
        frame[n - 1] = 0xff;
        let err = decode_response(body(frame)).unwrap_err();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn a_payload_after_any_other_frame_is_a_protocol_error() {
        let frame = encode_frame_with(&Response::Killed { id: 1, ok: true }, b"x").unwrap();
        assert!(decode_response(body(frame)).is_err());
    }
}

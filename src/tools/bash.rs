//! The bash tool, driven from the worker side: one persistent `/bin/bash` per
//! session, started lazily inside the session's sandbox, fed each command in the
//! same wrapper the SDK worker uses (so bash's own messages, line numbers
//! included, read the same), and read back until a per-call sentinel.
//!
//! Differences from the SDK worker (README): a timeout, restart or session close
//! kills the shell *and every process of the session* (background jobs,
//! setsid'ed daemons), not only the bash pid; the output buffer keeps only the
//! tail, so the worker's memory stays flat whatever the command prints.

use std::os::fd::OwnedFd;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

use super::{input, timed_out, ToolResult};

/// Where the shell runs: a session's sandbox, which implements this (the
/// tools know nothing of the sandbox; the sandbox runs the tools).
pub trait ShellHost: Sync {
    /// Starts `argv` in the workspace with `env`, stdin from `stdin`, stdout
    /// and stderr to `stdout`; every process it starts dies with it.
    fn spawn_shell(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        stdin: &OwnedFd,
        stdout: &OwnedFd,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;

    /// Kills every process of the session but its supervisor, and waits
    /// until they are gone.
    fn kill_everything(&self) -> impl std::future::Future<Output = ()> + Send;
}

/// The shell, exactly as the SDK starts it.
pub const SHELL_ARGV: [&str; 3] = ["/bin/bash", "--noprofile", "--norc"];

/// Limits of one session's bash tool, from the policy.
#[derive(Debug, Clone)]
pub struct BashLimits {
    /// Bytes of output kept per call (the tail); contract: 102400.
    pub output_bytes: usize,
    /// Timeout when `timeout_ms` is absent or zero; contract: 120 s.
    pub default_timeout: Duration,
    /// Hard cap of a call; past it the result is `tool 'bash' timed out`.
    pub call_timeout: Duration,
}

/// Receives a call's raw output as it is produced (stdout and stderr merged,
/// before post-processing; the framing sentinel never reaches it).
pub type OutputSink<'a> = &'a (dyn Fn(&[u8]) + Send + Sync);

/// Passes output on to a sink as it arrives, holding back only a tail that
/// could be the start of the sentinel line (`\n` + sentinel): usually nothing or
/// one newline, so output streams without delay and the framing never leaks.
struct Streamer<'a> {
    sink: OutputSink<'a>,
    pending: Vec<u8>,
    /// `\n` + the sentinel.
    marker: Vec<u8>,
}

impl Streamer<'_> {
    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        // A complete marker: everything after it is the exit code; `done` sends
        // what precedes it.
        if memchr::memmem::find(&self.pending, &self.marker).is_some() {
            return;
        }
        let max = self.marker.len().min(self.pending.len());
        let hold = (1..=max)
            .rev()
            .find(|k| self.pending[self.pending.len() - k..] == self.marker[..*k])
            .unwrap_or(0);
        let n = self.pending.len() - hold;
        if n > 0 {
            (self.sink)(&self.pending[..n]);
            self.pending.drain(..n);
        }
    }

    /// The sentinel line arrived: pass on what precedes it.
    fn done(&mut self) {
        let end = memchr::memmem::rfind(&self.pending, &self.marker).unwrap_or(self.pending.len());
        if end > 0 {
            (self.sink)(&self.pending[..end]);
        }
        self.pending.clear();
    }

    /// EOF: the shell died; everything read is output.
    fn eof(&mut self) {
        if !self.pending.is_empty() {
            (self.sink)(&self.pending);
        }
        self.pending.clear();
    }
}

/// A running shell.
struct Shell {
    stdin: pipe::Sender,
    stdout: pipe::Receiver,
}

/// The per-session shell state.
#[derive(Default)]
pub struct BashSession {
    shell: Option<Shell>,
    /// Read buffer reused across calls.
    chunk: Vec<u8>,
    /// Set when the shell died (timeout, `exit`, crash); cleared by restart.
    dead: bool,
    /// Set when the last call ended by a timeout.
    timed_out: bool,
}

/// The ANSI CSI sequences the SDK strips from output.
fn ansi() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\x1b\[[0-9;?]*[ -/]*[@-~]").expect("static regex"))
}

/// Python's `repr(float)` for the timeout shown in the timeout message
/// (`120.0`, `0.5`, `12.345`).
pub fn py_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Python's `str.strip()` whitespace: Unicode White_Space plus the ASCII
/// separators \x1c–\x1f that `str.isspace` also counts.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    // A predictable sentinel only lets the agent end its own command's output
    // early; fall back to time if the kernel RNG is unavailable.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The text written to the shell for one call, and the sentinel to wait for.
/// The sentinel literal never appears in what is written: an empty quoted
/// string splits it, and only the shell's printf reassembles it.
pub fn wrap(command: &str) -> (String, String) {
    let sentinel = format!("__ANT_CMD_{}_DONE__", random_hex());
    let split = format!("{}''{}", &sentinel[..8], &sentinel[8..]);
    let wrapped = format!("{{ {command}\n}} </dev/null 2>&1; printf '\\n{split}%d\\n' $?\n");
    (wrapped, sentinel)
}

/// Turns what was read into (output, exit code), as the SDK does: lossy UTF-8,
/// ANSI CSI removed, text before the last sentinel with trailing newlines
/// removed, the exit code after it (-1 when unparsable); without a sentinel (the
/// shell died) everything read, stripped, with -1.
pub fn parse_output(raw: &[u8], sentinel: &str, truncated: bool) -> (String, i64) {
    let text = String::from_utf8_lossy(raw);
    let text = ansi().replace_all(&text, "");
    match text.rfind(sentinel) {
        None => (text.trim_matches(py_space).to_string(), -1),
        Some(idx) => {
            let out = text[..idx].trim_end_matches('\n');
            let tail = text[idx + sentinel.len()..].trim_matches(py_space);
            let code = tail
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<i64>().ok())
                .unwrap_or(-1);
            let out = if truncated {
                format!("[output truncated]\n{out}")
            } else {
                out.to_string()
            };
            (out, code)
        }
    }
}

enum ReadEnd {
    /// The sentinel and its exit-code line arrived.
    Done,
    /// EOF: the shell died.
    Eof,
}

/// Reads until the sentinel line or EOF, keeping only the last `limit` bytes.
async fn read_until(
    stdout: &mut pipe::Receiver,
    sentinel: &[u8],
    limit: usize,
    buf: &mut Vec<u8>,
    truncated: &mut bool,
    chunk: &mut Vec<u8>,
    mut stream: Option<&mut Streamer<'_>>,
) -> std::io::Result<ReadEnd> {
    let finder = memchr::memmem::Finder::new(sentinel);
    chunk.resize(64 * 1024, 0);
    loop {
        let n = stdout.read(chunk).await?;
        if n == 0 {
            if let Some(st) = stream.as_deref_mut() {
                st.eof();
            }
            return Ok(ReadEnd::Eof);
        }
        if let Some(st) = stream.as_deref_mut() {
            st.push(&chunk[..n]);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > limit {
            let cut = buf.len() - limit;
            buf.drain(..cut);
            *truncated = true;
        }
        // Only the new bytes can complete a match: search them plus a sentinel
        // and an exit-code line's worth of bytes before them.
        let from = buf.len().saturating_sub(n + sentinel.len() + 32);
        if let Some(pos) = finder.find(&buf[from..]) {
            let after = &buf[from + pos + sentinel.len()..];
            if after.contains(&b'\n') {
                if let Some(st) = stream.as_deref_mut() {
                    st.done();
                }
                return Ok(ReadEnd::Done);
            }
        }
    }
}

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

impl BashSession {
    async fn start(
        &mut self,
        helper: &impl ShellHost,
        env: &[(String, String)],
    ) -> Result<(), String> {
        let (in_r, in_w) = pipe_pair().map_err(|e| e.to_string())?;
        let (out_r, out_w) = pipe_pair().map_err(|e| e.to_string())?;
        helper
            .spawn_shell(
                SHELL_ARGV.iter().map(|s| s.to_string()).collect(),
                env.to_vec(),
                &in_r,
                &out_w,
            )
            .await?;
        // Our copies of the child's ends must go, or EOF never comes.
        drop((in_r, out_w));
        let stdin = pipe::Sender::from_owned_fd(in_w).map_err(|e| e.to_string())?;
        let stdout = pipe::Receiver::from_owned_fd(out_r).map_err(|e| e.to_string())?;
        self.shell = Some(Shell { stdin, stdout });
        self.dead = false;
        Ok(())
    }

    /// Kills the shell and everything the session started, and leaves the
    /// session needing a restart (a cancelled call, like a timed-out one).
    pub async fn abort(&mut self, helper: &impl ShellHost) {
        self.kill(helper).await;
        self.dead = true;
    }

    /// Whether the last call ended by its own timeout or the call timeout.
    pub fn last_timed_out(&self) -> bool {
        self.timed_out
    }

    /// Kills the shell and everything the session started.
    pub async fn kill(&mut self, helper: &impl ShellHost) {
        self.shell = None;
        helper.kill_everything().await;
    }

    /// One bash tool call.
    pub async fn call(
        &mut self,
        helper: &impl ShellHost,
        raw_input: &Value,
        limits: &BashLimits,
        env: &[(String, String)],
        sink: Option<OutputSink<'_>>,
    ) -> ToolResult {
        // Every call answers for itself: a restart after a timeout did not time out.
        self.timed_out = false;
        let inp = match input::parse_bash(raw_input) {
            Ok(i) => i,
            Err(e) => return e,
        };
        if inp.restart.unwrap_or(false) {
            self.kill(helper).await;
            return match self.start(helper, env).await {
                Ok(()) => ToolResult::ok("bash session restarted"),
                Err(e) => ToolResult::err(format!("bash: {e}")),
            };
        }
        let command = match inp.command.as_deref() {
            Some(c) if !c.is_empty() => c,
            _ => return ToolResult::err("bash: command is required"),
        };
        let timeout_s = match inp.timeout_ms {
            Some(ms) if ms != 0 => ms as f64 / 1000.0,
            _ => limits.default_timeout.as_secs_f64(),
        };
        let call_s = limits.call_timeout.as_secs_f64();
        let (limit_s, own_timeout) = if timeout_s <= call_s {
            (timeout_s, true)
        } else {
            (call_s, false)
        };
        let deadline = Duration::from_secs_f64(limit_s.max(0.0));

        let run = self.exec(helper, command, limits.output_bytes, env, sink);
        let outcome = tokio::time::timeout(deadline, run).await;
        self.timed_out = outcome.is_err();
        match outcome {
            Ok(r) => r,
            Err(_) => {
                self.kill(helper).await;
                self.dead = true;
                if own_timeout {
                    ToolResult::err(format!(
                        "bash: bash command timed out after {}s",
                        py_float(timeout_s)
                    ))
                } else {
                    timed_out("bash")
                }
            }
        }
    }

    async fn exec(
        &mut self,
        helper: &impl ShellHost,
        command: &str,
        limit: usize,
        env: &[(String, String)],
        sink: Option<OutputSink<'_>>,
    ) -> ToolResult {
        if self.dead {
            return ToolResult::err("bash: bash session terminated; restart required");
        }
        if self.shell.is_none() {
            if let Err(e) = self.start(helper, env).await {
                return ToolResult::err(format!("bash: {e}"));
            }
        }
        let Some(shell) = self.shell.as_mut() else {
            return ToolResult::err("bash: bash session terminated; restart required");
        };
        let (wrapped, sentinel) = wrap(command);
        if shell.stdin.write_all(wrapped.as_bytes()).await.is_err() {
            // The shell is gone; report like the SDK does for a dead session.
            self.shell = None;
            self.dead = true;
            return ToolResult::err("bash: bash session terminated; restart required");
        }
        let mut buf = Vec::new();
        let mut truncated = false;
        let mut streamer = sink.map(|sink| Streamer {
            sink,
            pending: Vec::new(),
            marker: [b"\n".as_slice(), sentinel.as_bytes()].concat(),
        });
        let end = read_until(
            &mut shell.stdout,
            sentinel.as_bytes(),
            limit,
            &mut buf,
            &mut truncated,
            &mut self.chunk,
            streamer.as_mut(),
        )
        .await;
        let (out, code) = match end {
            Ok(ReadEnd::Done) => parse_output(&buf, &sentinel, truncated),
            Ok(ReadEnd::Eof) | Err(_) => {
                self.shell = None;
                self.dead = true;
                parse_output(&buf, &sentinel, false)
            }
        };
        if code == 0 {
            ToolResult::ok(out)
        } else {
            ToolResult::err(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_matches_the_sdk_shape() {
        let (w, s) = wrap("echo hi");
        assert!(s.starts_with("__ANT_CMD_") && s.ends_with("_DONE__") && s.len() == 10 + 32 + 7);
        assert!(!w.contains(&s), "the sentinel literal must not be written");
        assert!(w.starts_with("{ echo hi\n} </dev/null 2>&1; printf '\\n__ANT_CM''D_"));
        assert!(w.ends_with("_DONE__%d\\n' $?\n"));
    }

    #[test]
    fn parse_output_cases() {
        let s = "__ANT_CMD_0123_DONE__";
        let raw = format!("\nhello\n\n\n{s}0\n");
        assert_eq!(
            parse_output(raw.as_bytes(), s, false),
            ("\nhello".into(), 0)
        );
        let raw = format!("\x1b[31mred\x1b[0m\n{s}3\n");
        assert_eq!(parse_output(raw.as_bytes(), s, false), ("red".into(), 3));
        assert_eq!(parse_output(b"  oops \n", s, false), ("oops".into(), -1));
        let raw = format!("tail\n{s}1\n");
        assert_eq!(
            parse_output(raw.as_bytes(), s, true),
            ("[output truncated]\ntail".into(), 1)
        );
        let raw = format!("x\n{s}zz\n");
        assert_eq!(parse_output(raw.as_bytes(), s, false).1, -1);
    }

    #[test]
    fn streamer_passes_output_on_at_once_and_never_the_sentinel() {
        let got = std::sync::Mutex::new(Vec::<Vec<u8>>::new());
        let sink = |b: &[u8]| got.lock().unwrap().push(b.to_vec());
        let sentinel = "__ANT_CMD_00ff_DONE__";
        let mut st = Streamer {
            sink: &sink,
            pending: Vec::new(),
            marker: [b"\n".as_slice(), sentinel.as_bytes()].concat(),
        };
        st.push(b"line1\n");
        // The trailing newline could start the marker: held back, the rest sent.
        assert_eq!(got.lock().unwrap().concat(), b"line1");
        st.push(b"line2\n");
        assert_eq!(got.lock().unwrap().concat(), b"line1\nline2");
        st.push(b"\n__ANT_CM");
        st.push(b"D_00ff_DONE__0\n");
        st.done();
        assert_eq!(got.lock().unwrap().concat(), b"line1\nline2\n");
    }

    #[test]
    fn py_float_formats_like_python() {
        assert_eq!(py_float(120.0), "120.0");
        assert_eq!(py_float(0.5), "0.5");
        assert_eq!(py_float(0.3), "0.3");
        assert_eq!(py_float(12.345), "12.345");
        assert_eq!(py_float(-0.005), "-0.005");
    }
}

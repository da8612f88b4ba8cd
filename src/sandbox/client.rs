//! The worker's handle on one session helper: starts it in fresh namespaces and
//! the session's cgroup, performs the setup handshake, then multiplexes requests
//! (file tools, spawns, kills) over the channel and routes the helper's answers
//! and exit reports back to their callers.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// The helper's side of the channel, as the worker reads it.
type HelperReader = tokio::io::BufReader<OwnedReadHalf>;
use tokio::sync::{mpsc, oneshot};

use super::cgroup::{CgroupError, SessionCgroup};
use super::proto::{self, ConfinementReport, Request, Response, Setup};
use super::{helper, sys, SandboxConfig};
use crate::tools::{Tool, ToolResult};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what}: {cause}")]
    Host {
        what: &'static str,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("session helper setup failed at {stage}: {error}")]
    Setup { stage: String, error: String },
    #[error("session helper died{0}")]
    HelperDied(String),
    #[error("session helper sent an invalid frame: {0}")]
    Protocol(String),
    #[error("session helper did not answer within {0:?}")]
    Timeout(Duration),
    /// The program could not be started (`errno` ENOENT: there is no such
    /// program in the sandbox).
    #[error("{program}: {message}")]
    Spawn {
        program: String,
        message: String,
        errno: Option<i32>,
    },
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |cause| SandboxError::Host { what, cause }
}

enum ExitSlot {
    Done(i32),
    Waiting(oneshot::Sender<i32>),
}

#[derive(Default)]
struct Routes {
    /// Callers waiting for the answer to request `id`.
    pending: HashMap<u64, oneshot::Sender<Response>>,
    /// Exit status of spawned pids, or the caller waiting for it.
    exits: HashMap<i32, ExitSlot>,
}

/// A frame on its way to the helper, with the fds that travel with it.
struct Outgoing {
    frame: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// The way frames go out to the helper. A frame is never left half written
/// by a caller that gives up (a cancelled call, a dropped future): either its
/// caller writes it whole in one non-blocking `sendmsg`, without awaiting, or
/// it goes to the writer task, which writes each frame to its end. The caller
/// writes only while the task has nothing queued or half written (so frames
/// keep their order); that saves the common call a hop to the writer task.
struct Out {
    half: Arc<OwnedWriteHalf>,
    queue: mpsc::UnboundedSender<Outgoing>,
    /// True while the writer task owns the channel: a frame queued or partly
    /// written. Changed only with this lock held, as is every enqueue.
    task_owns: Arc<Mutex<bool>>,
}

impl Out {
    /// Sends `out`; an error means the channel is gone (the helper died).
    fn send(&self, out: Outgoing) -> Result<(), ()> {
        let mut owns = lock(&self.task_owns);
        let rest = if *owns {
            out
        } else {
            let stream: &tokio::net::UnixStream = (*self.half).as_ref();
            let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
            let sent = stream.try_io(Interest::WRITABLE, || {
                sys::send_with_fds(stream_fd(stream), &out.frame, &fds)
            });
            drop(fds);
            match sent {
                Ok(n) if n == out.frame.len() => return Ok(()),
                // The fds went with the first byte.
                Ok(n) => Outgoing {
                    frame: out.frame[n..].to_vec(),
                    fds: Vec::new(),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => out,
                Err(_) => return Err(()),
            }
        };
        *owns = true;
        self.queue.send(rest).map_err(drop)
    }
}

/// A running session helper.
pub struct HelperClient {
    pid: i32,
    pidfd: OwnedFd,
    writer: Out,
    /// Shared with the reader task, which is the only one removing routes.
    routes: Arc<Mutex<Routes>>,
    next_id: AtomicU64,
    /// Set by the reader task when the channel closed.
    dead: Arc<AtomicBool>,
    report: ConfinementReport,
    reader: tokio::task::JoinHandle<()>,
    writer_task: tokio::task::JoinHandle<()>,
    /// The egress listeners made in the session's namespace, until taken.
    egress: Mutex<Option<super::netfilter::Listeners>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

impl HelperClient {
    /// Starts the helper for `setup` inside `cgroup`:
    /// 1. two socketpairs, one each way; clone the helper into new mount, pid,
    ///    network, ipc and uts namespaces, exec'ing `cfg.helper_exe
    ///    __sandbox-helper` with an empty environment, its requests as fd 3 and
    ///    its answers as fd 4 (its `argv[0]` is `hands`, so the host path of the
    ///    binary is not in the session's `/proc/1/cmdline`). One socket each way,
    ///    because a unix socket wakes a reader asleep on it whenever room frees
    ///    up for its own writes: on one socket, each answer the worker read woke
    ///    the helper's reading thread for nothing;
    /// 2. move it into the session cgroup before it does anything (it blocks on
    ///    the setup frame);
    /// 3. send the setup with a detached clone of the workspace's mount (taken
    ///    from the directory fd, never by path), wait for `Ready` (or the stage
    ///    that failed);
    /// 4. start the reader task that routes answers.
    pub async fn start(
        cfg: &SandboxConfig,
        setup: &Setup,
        workspace: BorrowedFd<'_>,
        cgroup: &SessionCgroup,
    ) -> Result<HelperClient, SandboxError> {
        let pair = || std::os::unix::net::UnixStream::pair().map_err(host("socketpair"));
        let (requests, their_requests) = pair()?;
        let (answers, their_answers) = pair()?;
        let exe = CString::new(cfg.helper_exe.as_os_str().as_bytes())
            .map_err(|e| host("helper path")(std::io::Error::other(e)))?;
        let stage = CString::new(helper::ARG)
            .map_err(|e| host("helper stage")(std::io::Error::other(e)))?;
        let argv = [c"hands".to_owned(), stage];
        let flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        let pid = sys::clone_exec_helper(
            flags,
            &exe,
            &argv,
            their_requests.as_fd(),
            their_answers.as_fd(),
        )
        .map_err(host("cloning the session helper"))?;
        drop((their_requests, their_answers));
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                return Err(host("pidfd_open")(e));
            }
        };
        let kill_and_reap = |pidfd: &OwnedFd| {
            let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        };
        if let Err(e) = cgroup.add_process(pid as u32) {
            kill_and_reap(&pidfd);
            return Err(e.into());
        }

        let stream = |s: std::os::unix::net::UnixStream| {
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        };
        // Nothing is read from the requests socket, nor written to the answers
        // one (dropping that write half shuts down a direction never used).
        let (_, write_half) = stream(requests).map_err(host("socket"))?.into_split();
        let (read_half, _) = stream(answers).map_err(host("socket"))?.into_split();
        // A frame of up to 32 KiB (most results) arrives in one read; the
        // buffer is per session, so it stays small.
        let mut read_half = tokio::io::BufReader::with_capacity(32 << 10, read_half);
        let routes: Arc<Mutex<Routes>> = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let (queue, outgoing) = mpsc::unbounded_channel();
        let writer = Out {
            half: Arc::new(write_half),
            queue,
            task_owns: Arc::default(),
        };
        let writer_task = tokio::spawn(write_forever(
            writer.half.clone(),
            writer.task_owns.clone(),
            outgoing,
            routes.clone(),
            dead.clone(),
        ));
        // The egress barrier and the worker's listeners, in the helper's
        // namespace before it learns what to build: nothing the session runs
        // ever sees the namespace without them.
        let listeners = if setup.net == proto::NetMode::Egress {
            let made = tokio::task::spawn_blocking(move || {
                super::netfilter::in_netns_of(pid, super::netfilter::install_with_listeners)
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
            match made {
                Ok(l) => Some(l),
                Err(e) => {
                    kill_and_reap(&pidfd);
                    writer_task.abort();
                    return Err(host("installing the egress barrier")(e));
                }
            }
        } else {
            None
        };
        // A detached copy of the workspace's mount, made here in the worker's
        // mount namespace (a mount of another namespace cannot be cloned from
        // inside the helper's); the helper idmaps and attaches it.
        let ws = match sys::open_tree_clone_fd(workspace) {
            Ok(fd) => fd,
            Err(e) => {
                kill_and_reap(&pidfd);
                writer_task.abort();
                return Err(host("cloning the workspace mount")(e));
            }
        };
        let handshake = async {
            let frame = proto::encode_frame(setup).map_err(host("encode"))?;
            writer
                .send(Outgoing {
                    frame,
                    fds: vec![ws],
                })
                .map_err(|_| SandboxError::HelperDied(" before setup".into()))?;
            read_response(&mut read_half).await
        };
        let first = match tokio::time::timeout(SETUP_TIMEOUT, handshake).await {
            Ok(r) => r,
            Err(_) => Err(SandboxError::Timeout(SETUP_TIMEOUT)),
        };
        let report = match first {
            Ok(Some(Response::Ready { report })) => report,
            Ok(Some(Response::SetupFailed { stage, error })) => {
                kill_and_reap(&pidfd);
                writer_task.abort();
                return Err(SandboxError::Setup { stage, error });
            }
            Ok(Some(other)) => {
                kill_and_reap(&pidfd);
                writer_task.abort();
                return Err(SandboxError::Protocol(format!(
                    "expected Ready, got {other:?}"
                )));
            }
            Ok(None) => {
                writer_task.abort();
                let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                return Err(SandboxError::HelperDied(format!(
                    " during setup ({status:?})"
                )));
            }
            Err(e) => {
                kill_and_reap(&pidfd);
                writer_task.abort();
                return Err(e);
            }
        };

        let reader = tokio::spawn(route_forever(read_half, routes.clone(), dead.clone()));
        Ok(HelperClient {
            pid,
            pidfd,
            writer,
            routes,
            next_id: AtomicU64::new(1),
            dead,
            report,
            reader,
            writer_task,
            egress: Mutex::new(listeners),
        })
    }

    /// The worker's listeners in an `egress` session's namespace, once.
    pub fn take_egress_listeners(&self) -> Option<super::netfilter::Listeners> {
        lock(&self.egress).take()
    }

    /// What the helper enforced.
    pub fn report(&self) -> &ConfinementReport {
        &self.report
    }

    /// Host pid of the helper (pid 1 of the session's pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `req` and waits for its answer. The frame is written whole, or
    /// handed to the writer task, before the first await ([`Out`]), so
    /// dropping this future at any point leaves the channel framed.
    async fn request(
        &self,
        id: u64,
        req: &Request,
        fds: Vec<OwnedFd>,
    ) -> Result<Response, SandboxError> {
        let frame = proto::encode_frame(req).map_err(host("encode"))?;
        self.send_frame(id, frame, fds).await
    }

    /// Sends an encoded request frame and waits for its answer.
    async fn send_frame(
        &self,
        id: u64,
        frame: Vec<u8>,
        fds: Vec<OwnedFd>,
    ) -> Result<Response, SandboxError> {
        if self.is_dead() {
            return Err(SandboxError::HelperDied(String::new()));
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.routes).pending.insert(id, tx);
        if self.writer.send(Outgoing { frame, fds }).is_err() {
            lock(&self.routes).pending.remove(&id);
            return Err(SandboxError::HelperDied(String::new()));
        }
        rx.await
            .map_err(|_| SandboxError::HelperDied(String::new()))
    }

    /// Runs a file tool in the helper on `input`, JSON text passed through as
    /// it is (the helper parses it). Dropping the future raises the tool's
    /// cancel flag.
    pub async fn tool(&self, tool: Tool, input: &str) -> Result<ToolResult, SandboxError> {
        let id = self.next_id();
        let guard = CancelOnDrop {
            client: self,
            id,
            armed: true,
        };
        let frame = proto::encode_frame_with(&Request::Tool { id, tool }, input.as_bytes())
            .map_err(host("encode"));
        let resp = match frame {
            Ok(frame) => self.send_frame(id, frame, Vec::new()).await,
            Err(e) => Err(e),
        };
        let mut guard = guard;
        guard.armed = false;
        match resp? {
            Response::ToolDone { result, .. } => Ok(result),
            other => Err(SandboxError::Protocol(format!(
                "expected ToolDone, got {other:?}"
            ))),
        }
    }

    /// Starts `argv` in the session with the given stdio; returns its pid inside
    /// the session and a receiver of its exit status.
    pub async fn spawn(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: std::path::PathBuf,
        stdio: [&OwnedFd; 3],
        kill_all_on_exit: bool,
    ) -> Result<(i32, oneshot::Receiver<i32>), SandboxError> {
        let id = self.next_id();
        let program = argv.first().cloned().unwrap_or_default();
        let req = Request::Spawn {
            id,
            argv,
            env,
            cwd,
            kill_all_on_exit,
        };
        let mut fds = Vec::with_capacity(3);
        for fd in stdio {
            fds.push(fd.try_clone().map_err(host("duplicating stdio"))?);
        }
        match self.request(id, &req, fds).await? {
            Response::Spawned { pid, .. } => {
                let (tx, rx) = oneshot::channel();
                let mut routes = lock(&self.routes);
                match routes.exits.remove(&pid) {
                    Some(ExitSlot::Done(status)) => {
                        let _ = tx.send(status);
                    }
                    _ => {
                        routes.exits.insert(pid, ExitSlot::Waiting(tx));
                    }
                }
                Ok((pid, rx))
            }
            Response::SpawnFailed { error, errno, .. } => Err(SandboxError::Spawn {
                program,
                message: error,
                errno,
            }),
            other => Err(SandboxError::Protocol(format!(
                "expected Spawned, got {other:?}"
            ))),
        }
    }

    /// Kills every process of the session but the helper; true when none is left.
    pub async fn kill_all(&self) -> Result<bool, SandboxError> {
        let id = self.next_id();
        match self
            .request(id, &Request::KillAll { id }, Vec::new())
            .await?
        {
            Response::Killed { ok, .. } => Ok(ok),
            other => Err(SandboxError::Protocol(format!(
                "expected Killed, got {other:?}"
            ))),
        }
    }

    /// Kills the helper — and with it, as the pid namespace's init, every process
    /// of the session — and reaps it.
    pub async fn shutdown(&self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
        self.reader.abort();
        self.writer_task.abort();
        let pid = self.pid;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        })
        .await;
    }

    /// Synchronous variant for Drop paths.
    pub fn kill_now(&self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
        self.reader.abort();
        self.writer_task.abort();
    }
}

struct CancelOnDrop<'a> {
    client: &'a HelperClient,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        lock(&self.client.routes).pending.remove(&self.id);
        if let Ok(frame) = proto::encode_frame(&Request::Cancel { id: self.id }) {
            let _ = self.client.writer.send(Outgoing {
                frame,
                fds: Vec::new(),
            });
        }
    }
}

/// Writes frames in the order they were queued, each to its end. When the
/// channel fails the helper is gone: mark the client dead and fail every waiting
/// caller.
async fn write_forever(
    w: Arc<OwnedWriteHalf>,
    task_owns: Arc<Mutex<bool>>,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    routes: Arc<Mutex<Routes>>,
    dead: Arc<AtomicBool>,
) {
    while let Some(out) = outgoing.recv().await {
        let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
        if write_frame(&w, &out.frame, &fds).await.is_err() {
            break;
        }
        // Nothing more queued (checked under the lock every enqueue takes):
        // callers may write again.
        let mut owns = lock(&task_owns);
        if outgoing.is_empty() {
            *owns = false;
        }
    }
    dead.store(true, Ordering::Relaxed);
    lock(&routes).pending.clear();
}

async fn write_frame(
    w: &OwnedWriteHalf,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), SandboxError> {
    let stream: &tokio::net::UnixStream = w.as_ref();
    let mut off = 0;
    while off < frame.len() {
        stream.writable().await.map_err(host("helper channel"))?;
        let attach: &[BorrowedFd<'_>] = if off == 0 { fds } else { &[] };
        match stream.try_io(Interest::WRITABLE, || {
            sys::send_with_fds(stream_fd(stream), &frame[off..], attach)
        }) {
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(SandboxError::HelperDied(format!(": {e}"))),
        }
    }
    Ok(())
}

fn stream_fd(s: &tokio::net::UnixStream) -> std::os::fd::BorrowedFd<'_> {
    s.as_fd()
}

async fn read_response(r: &mut HelperReader) -> Result<Option<Response>, SandboxError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(SandboxError::HelperDied(format!(": {e}"))),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > proto::MAX_FRAME {
        return Err(SandboxError::Protocol(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| SandboxError::HelperDied(format!(": {e}")))?;
    proto::decode_response(body)
        .map(Some)
        .map_err(SandboxError::Protocol)
}

async fn route_forever(mut r: HelperReader, routes: Arc<Mutex<Routes>>, dead: Arc<AtomicBool>) {
    loop {
        let resp = match read_response(&mut r).await {
            Ok(Some(resp)) => resp,
            Ok(None) | Err(_) => break,
        };
        let mut routes = lock(&routes);
        match resp {
            Response::ToolDone { id, .. }
            | Response::ToolText { id, .. }
            | Response::Spawned { id, .. }
            | Response::SpawnFailed { id, .. }
            | Response::Killed { id, .. } => {
                if let Some(tx) = routes.pending.remove(&id) {
                    let _ = tx.send(resp);
                }
            }
            Response::Exited { pid, status } => match routes.exits.remove(&pid) {
                Some(ExitSlot::Waiting(tx)) => {
                    let _ = tx.send(status);
                }
                _ => {
                    routes.exits.insert(pid, ExitSlot::Done(status));
                }
            },
            // Setup answers after setup are a protocol violation; end the session.
            Response::Ready { .. } | Response::SetupFailed { .. } => break,
        }
    }
    dead.store(true, Ordering::Relaxed);
    let mut routes = lock(&routes);
    routes.pending.clear();
    routes.exits.clear();
}

impl crate::tools::bash::ShellHost for HelperClient {
    async fn spawn_shell(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        stdin: &OwnedFd,
        stdout: &OwnedFd,
    ) -> Result<(), String> {
        self.spawn(
            argv,
            env,
            super::mounts::WORKSPACE.into(),
            [stdin, stdout, stdout],
            true,
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
    }

    async fn kill_everything(&self) {
        let _ = self.kill_all().await;
    }
}

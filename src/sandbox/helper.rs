//! The session helper: the process a session's tools run in. It starts as root in
//! fresh namespaces (the worker cloned it), builds the session's filesystem view,
//! drops to the session's uid with no capabilities, confines itself with
//! no_new_privs, landlock and seccomp, and then serves: file tools run on its own
//! threads, processes (the shell, `hands exec` commands) are its children.
//!
//! It is pid 1 of the session's pid namespace, so when it dies the kernel kills
//! every process of the session, setsid'ed and double-forked daemons included.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};

use super::landlock;
use super::mounts;
use super::proto::{self, ConfinementReport, Request, Response, Setup};
use super::seccomp;
use super::sys;
use crate::tools::fs::FsContext;

/// Hidden subcommand that selects the helper stage.
pub const ARG: &str = "__sandbox-helper";

/// Reads frames from the socket, collecting fds that arrive with them.
struct FdReader {
    sock: OwnedFd,
    buf: Vec<u8>,
    pos: usize,
    fds: VecDeque<OwnedFd>,
}

impl Read for FdReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.resize(64 * 1024, 0);
            let (n, fds) = sys::recv_with_fds(self.sock.as_fd(), &mut self.buf)?;
            self.buf.truncate(n);
            self.pos = 0;
            self.fds.extend(fds);
            if n == 0 {
                return Ok(0);
            }
        }
        let n = (self.buf.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

type Writer = Arc<Mutex<UnixStream>>;

fn send(w: &Writer, msg: &Response) {
    // A failed write means the worker is gone; the read side notices and exits.
    let mut guard = match w.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let _ = proto::write_frame(&mut *guard, msg);
}

/// Sends the result of file tool call `id`, encoded before the writer is taken.
fn send_result(w: &Writer, id: u64, result: &crate::tools::ToolResult) {
    let frame = match proto::encode_result(id, result) {
        Ok(frame) => frame,
        // Over the frame limit (the tools bound their output far below it).
        Err(e) => match proto::encode_result(
            id,
            &crate::tools::ToolResult::err(format!("the result could not be sent: {e}")),
        ) {
            Ok(frame) => frame,
            Err(_) => return,
        },
    };
    let mut guard = match w.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let _ = guard.write_all(&frame);
}

/// Entry point of `hands __sandbox-helper`. Never returns.
pub fn main() -> ! {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("hands sandbox helper: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn run() -> io::Result<()> {
    // First, before anything of the session runs: with no handler left, no
    // signal from inside the namespace reaches its init (see sys).
    sys::default_fault_signals()?;
    // Requests come on fd 3, answers go on fd 4: one socket each way, so the
    // reading thread, asleep on the first, is never woken when the worker reads
    // an answer and frees room on the second.
    let requests = sys::take_inherited_fd(3)?;
    let answers = sys::take_inherited_fd(4)?;
    let writer: Writer = Arc::new(Mutex::new(UnixStream::from(answers)));
    let mut reader = FdReader {
        sock: requests,
        buf: Vec::new(),
        pos: 0,
        fds: VecDeque::new(),
    };
    let setup: Setup = proto::read_frame(&mut reader)?
        .ok_or_else(|| io::Error::other("worker closed the channel before setup"))?;
    // The setup frame carries exactly one fd: a detached clone of the workspace
    // mount.
    let workspace = reader.fds.pop_front();
    let confined = match workspace {
        Some(ws) => confine(&setup, ws),
        None => Err(("workspace", "no workspace fd with the setup".to_string())),
    };
    let (report, children) = match confined {
        Ok(r) => r,
        Err((stage, e)) => {
            send(
                &writer,
                &Response::SetupFailed {
                    stage: stage.to_string(),
                    error: e,
                },
            );
            return Err(io::Error::other(format!("setup failed at {stage}")));
        }
    };
    send(&writer, &Response::Ready { report });
    serve(setup, reader, writer, children)
}

type StageResult<T> = Result<T, (&'static str, String)>;

fn stage<T, E: std::fmt::Display>(name: &'static str, r: Result<T, E>) -> StageResult<T> {
    r.map_err(|e| (name, e.to_string()))
}

/// Confines the helper, in this order (each step needs the privileges that the
/// next ones remove):
/// 1. umask 022, then build the filesystem view and pivot into it (needs
///    CAP_SYS_ADMIN);
/// 2. set the hostname and, unless the network mode is `none` (no interface at
///    all), bring `lo` up in the session's network namespace;
/// 3. lock securebits so root can never regain capabilities by exec, and empty
///    the capability bounding set (needs CAP_SETPCAP);
/// 4. drop supplementary groups, then gid, then uid to the session's ids — the
///    uid switch clears every capability; verify CapEff is 0;
/// 5. no core dumps (RLIMIT_CORE 1, which pipe handlers honour too), at most
///    1024:524288 descriptors, not dumpable (its memory and /proc entries stay
///    closed to the processes it starts), cwd /workspace;
/// 6. no_new_privs;
/// 7. landlock (fails closed unless the policy accepts each missing feature);
/// 8. prepare what every child adds between fork and exec: a landlock domain of
///    its own that scopes signals (ABI ≥ 6), so the helper is outside its reach,
///    and the `openat2` filter (the ruleset is made before seccomp, which denies
///    creating rulesets);
/// 9. seccomp (after landlock: landlock's syscalls are on it).
fn confine(
    setup: &Setup,
    workspace: OwnedFd,
) -> StageResult<(ConfinementReport, Arc<sys::ChildConfinement>)> {
    // Before the session root is built: its directories and files get their
    // modes under this mask, whatever mask the worker was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let idmapped = stage("mounts", mounts::build(setup, workspace))?;

    stage("hostname", nix::unistd::sethostname("hands"))?;
    // Loopback and Egress: `lo` up (Egress's barrier was installed by the
    // worker before setup, see `netfilter`).
    if setup.net != proto::NetMode::None {
        stage("loopback", sys::loopback_up())?;
    }

    stage(
        "securebits",
        sys::set_securebits(
            sys::SECBIT_NOROOT
                | sys::SECBIT_NOROOT_LOCKED
                | sys::SECBIT_NO_SETUID_FIXUP_LOCKED
                | sys::SECBIT_KEEP_CAPS_LOCKED
                | sys::SECBIT_NO_CAP_AMBIENT_RAISE
                | sys::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED,
        ),
    )?;
    stage("bounding set", sys::drop_bounding_set())?;
    stage("ambient caps", sys::clear_ambient_caps())?;
    stage("setgroups", nix::unistd::setgroups(&[]))?;
    let gid = Gid::from_raw(setup.gid);
    let uid = Uid::from_raw(setup.uid);
    stage("setresgid", nix::unistd::setresgid(gid, gid, gid))?;
    stage("setresuid", nix::unistd::setresuid(uid, uid, uid))?;
    let caps = stage("read caps", sys::effective_caps())?;
    if caps != 0 {
        return Err(("drop caps", format!("capabilities remain: {caps:#x}")));
    }

    stage("rlimit core", sys::disable_core_dumps())?;
    stage("rlimit nofile", sys::session_nofile_limit())?;
    stage("dumpable", nix::sys::prctl::set_dumpable(false))?;
    stage("chdir", nix::unistd::chdir(mounts::WORKSPACE))?;

    stage("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    // Installed below, after landlock; landlock's judgement of a missing TCP
    // right counts on it.
    // Egress, like Loopback, keeps IPv4/IPv6 sockets: its barrier is nftables.
    let inet_refused = setup.net == proto::NetMode::None && !setup.weakened_inet_guard;
    let ll = stage(
        "landlock",
        landlock::enforce_on_current_thread(
            &mounts::landlock_rules(setup),
            &landlock::Acceptance {
                allowed: setup.allow_degraded.clone(),
                covered: setup.landlock_covered,
                inet_refused,
            },
        ),
    )?;
    let child_domain = stage("child landlock domain", landlock::child_scope_ruleset())?;
    let child_filter = stage("child seccomp filter", seccomp::child_program())?;
    let children = Arc::new(sys::ChildConfinement::new(child_filter, child_domain));
    stage(
        "seccomp",
        seccomp::install_on_current_thread(seccomp::Profile {
            no_inet: inet_refused,
            setid_guard: !setup.weakened_setid_guard,
        }),
    )?;

    Ok((
        ConfinementReport {
            landlock: ll,
            seccomp: true,
            no_new_privs: true,
            uid: setup.uid,
            effective_caps: caps,
            idmapped_workspace: idmapped,
        },
        children,
    ))
}

/// Processes the helper started, by pid.
struct Children {
    procs: Mutex<HashMap<i32, bool /* kill_all_on_exit */>>,
    spawned: Condvar,
}

fn serve(
    setup: Setup,
    mut reader: FdReader,
    writer: Writer,
    confinement: Arc<sys::ChildConfinement>,
) -> io::Result<()> {
    let children = Arc::new(Children {
        procs: Mutex::new(HashMap::new()),
        spawned: Condvar::new(),
    });
    {
        let children = children.clone();
        let writer = writer.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(&children, &writer))?;
    }
    let cancels: Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>> = Arc::default();
    let pool = Pool::new();
    let mut base = FsContext::new(mounts::WORKSPACE.into());
    base.max_file_bytes = setup.max_file_bytes;
    base.output_limit = setup.output_limit;

    while let Some((req, payload)) = proto::read_frame_with::<_, Request>(&mut reader)? {
        match req {
            Request::Tool { id, tool } => {
                // Not JSON cannot come from the worker, which checked it;
                // `null` then gets the tool's own refusal.
                let input: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
                let mut ctx = base.clone();
                if small_read(tool, &input) {
                    // Answered here, on the reading thread: a hop to the pool
                    // costs more than reading a small file.
                    let result = crate::tools::fs::run(tool, &input, &ctx);
                    send_result(&writer, id, &result);
                    continue;
                }
                ctx.cancel = Arc::new(AtomicBool::new(false));
                lock(&cancels).insert(id, ctx.cancel.clone());
                let writer = writer.clone();
                let cancels = cancels.clone();
                pool.run(Box::new(move || {
                    let result = crate::tools::fs::run(tool, &input, &ctx);
                    lock(&cancels).remove(&id);
                    send_result(&writer, id, &result);
                }));
            }
            Request::Cancel { id } => {
                if let Some(flag) = lock(&cancels).get(&id) {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Request::Spawn {
                id,
                argv,
                env,
                cwd,
                kill_all_on_exit,
            } => {
                // A Spawn frame carries exactly its three stdio fds; fds of a
                // later frame, if already received, stay queued for it.
                let n = reader.fds.len().min(3);
                let stdio: Vec<OwnedFd> = reader.fds.drain(..n).collect();
                // Hold the writer while spawning so the reaper cannot report the
                // exit before the worker has learnt the pid, and the children
                // table until the pid is in it: a child that exits at once is
                // reaped by the reaper thread, which must then find it here, or
                // its exit would be taken for an orphan's and never reported.
                let mut w = match writer.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                let mut procs = lock(&children.procs);
                let msg = match spawn(&argv, &env, &cwd, stdio, &confinement) {
                    Ok(pid) => {
                        procs.insert(pid, kill_all_on_exit);
                        children.spawned.notify_all();
                        Response::Spawned { id, pid }
                    }
                    Err(e) => Response::SpawnFailed {
                        id,
                        error: e.to_string(),
                        errno: e.raw_os_error(),
                    },
                };
                drop(procs);
                let _ = proto::write_frame(&mut *w, &msg);
            }
            Request::KillAll { id } => {
                let deadline = Instant::now() + Duration::from_secs(5);
                let ok = kill_all(Duration::from_secs(5)) && none_left(deadline);
                send(&writer, &Response::Killed { id, ok });
            }
        }
    }
    // The worker closed the channel: end the session. Exiting as pid 1 makes the
    // kernel kill everything left in the namespace.
    Ok(())
}

/// Reads of regular files up to this size are answered on the reading thread.
const SMALL_READ: u64 = 256 * 1024;

/// Whether call `input` of `tool` is a read of a regular file of at most
/// [`SMALL_READ`] bytes (as it is now: a file that grows meanwhile only makes
/// that one read slower; the read tool itself never blocks on a FIFO).
fn small_read(tool: crate::tools::Tool, input: &serde_json::Value) -> bool {
    if tool != crate::tools::Tool::Read {
        return false;
    }
    let Some(path) = input.get("file_path").and_then(|p| p.as_str()) else {
        return false;
    };
    let full = std::path::Path::new(mounts::WORKSPACE).join(path);
    std::fs::metadata(full).is_ok_and(|m| m.is_file() && m.len() <= SMALL_READ)
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads for file tool calls: idle threads are reused (a thread per call would
/// cost more than a small read), and a call that finds none idle gets a new one,
/// so a long grep never delays another call.
struct Pool {
    jobs: std::sync::mpsc::Sender<Job>,
    queue: Arc<Mutex<std::sync::mpsc::Receiver<Job>>>,
    idle: Arc<std::sync::atomic::AtomicUsize>,
}

/// Idle threads kept beyond this many exit after their call.
const POOL_KEEP: usize = 4;

impl Pool {
    fn new() -> Pool {
        let (jobs, rx) = std::sync::mpsc::channel();
        Pool {
            jobs,
            queue: Arc::new(Mutex::new(rx)),
            idle: Arc::default(),
        }
    }

    fn run(&self, job: Job) {
        use std::sync::atomic::Ordering::SeqCst;
        // Claim an idle thread, or start one; either way the job is queued and
        // some thread is free to take it.
        let claimed = self
            .idle
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !claimed {
            let queue = self.queue.clone();
            let idle = self.idle.clone();
            let spawned = std::thread::Builder::new()
                .name("tool".into())
                .spawn(move || loop {
                    let job = match lock(&queue).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    job();
                    if idle.load(SeqCst) >= POOL_KEEP {
                        return;
                    }
                    idle.fetch_add(1, SeqCst);
                });
            if spawned.is_err() {
                // Out of threads (the session's pids limit): run it here rather
                // than queue it for a thread that does not exist.
                job();
                return;
            }
        }
        let _ = self.jobs.send(job);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cwd: &std::path::Path,
    stdio: Vec<OwnedFd>,
    confinement: &Arc<sys::ChildConfinement>,
) -> io::Result<i32> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::other("empty argv"))?;
    let mut fds = stdio.into_iter();
    let mut next = || -> Stdio { fds.next().map(Stdio::from).unwrap_or_else(Stdio::null) };
    let (stdin, stdout, stderr) = (next(), next(), next());
    let mut cmd = Command::new(prog);
    confinement.apply_to(&mut cmd);
    let child = cmd
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        // Its own process group, so a job-control signal sent by the agent to its
        // group never reaches the helper.
        .process_group(0)
        .spawn()?;
    // std resets SIGPIPE to the default in the child; the Child handle is dropped
    // without waiting because the reaper thread collects every exit.
    Ok(child.id() as i32)
}

/// Reaps every child (the helper is the namespace's init, so orphans land here
/// too) and reports the exits of processes it spawned.
fn reap_forever(children: &Children, writer: &Writer) {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    loop {
        // Wait for an exit without reaping it: a child whose exec failed is
        // reaped by `Command::spawn` itself (which panics if it finds it gone),
        // while the Spawn handler holds `procs`. So the reaper reaps only with
        // `procs` held: after a spawn in progress has either recorded its pid
        // or reaped its failed child.
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(exited) => {
                let Some(pid) = exited.pid() else {
                    continue;
                };
                let mut procs = lock(&children.procs);
                let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(s) => s,
                    // Reaped already: a failed spawn's child.
                    Err(_) => continue,
                };
                let (pid, code) = match status {
                    WaitStatus::Exited(pid, code) => (pid, code),
                    WaitStatus::Signaled(pid, sig, _) => (pid, 128 + sig as i32),
                    _ => continue,
                };
                let flag = procs.remove(&pid.as_raw());
                if flag == Some(true) {
                    // Still holding `procs`: no spawn can slip in between
                    // this exit and the kill of what it left behind.
                    kill_all(Duration::from_secs(5));
                }
                drop(procs);
                if flag.is_some() {
                    send(
                        writer,
                        &Response::Exited {
                            pid: pid.as_raw(),
                            status: code,
                        },
                    );
                }
            }
            Err(nix::errno::Errno::ECHILD) => {
                // Nothing to reap until the next spawn: with no child, the
                // session has no process that could leave an orphan, and every
                // spawn records its pid and notifies under this lock, so none
                // is missed. An idle session's reaper sleeps until then (the
                // timeout is a backstop, not a poll).
                let guard = lock(&children.procs);
                if guard.is_empty() {
                    let _ = children
                        .spawned
                        .wait_timeout(guard, Duration::from_secs(60));
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Waits until the namespace holds no process but the helper, zombies
/// included: the reaper has collected every exit the kill caused, so the
/// session's pids limit is free again for what starts next. A killed shell's
/// kill-the-rest runs with the children table held from its reaping on, so
/// once its zombie is gone no spawn can precede that kill: without this wait,
/// a shell killed by a restart could be reaped after the restart's fresh shell
/// was spawned, and its kill-the-rest would land on the fresh shell.
fn none_left(deadline: Instant) -> bool {
    loop {
        if processes(true).is_empty() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Live (not zombie) processes of the namespace other than the helper.
fn live_processes() -> Vec<i32> {
    processes(false)
}

/// Processes of the namespace other than the helper; zombies only with
/// `zombies`.
fn processes(zombies: bool) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == 1 {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.trim_start().chars().next());
        let dead = matches!(state, Some('Z') | Some('X') | None);
        if !dead || (zombies && state == Some('Z')) {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs every process of the session except the helper until none is left.
/// kill(-1) from the namespace's init reaches every process in it; repeating it
/// catches children forked while the previous pass ran.
fn kill_all(wait: Duration) -> bool {
    let start = Instant::now();
    loop {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        if live_processes().is_empty() {
            return true;
        }
        if start.elapsed() > wait {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

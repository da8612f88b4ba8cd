//! The tamper-evident audit log: JSON lines, one record per event (a tool call
//! today; egress and the vault later), each with a sequence number and the
//! SHA-256 of the previous record's line, so that an edited, deleted, inserted or
//! reordered record breaks the chain where it happened. Records carry metadata
//! only, never a call's input or output.
//!
//! Rotation keeps the chain: when a file passes its size limit it is renamed to
//! `<file>.1` (older ones shift up to `<file>.<keep>`, the oldest dropped), and
//! the first record of the new file carries the hash of the last record of the
//! previous one and the next sequence number. [`verify`] checks one file, or
//! several given oldest first, and names the first record that breaks the chain.
//!
//! Several processes may append to one log (a worker, and `hands tool` or
//! `hands exec` run beside it): each append holds an exclusive `flock` on
//! `.<file>.lock` next to the log and picks the chain up from the file's tail
//! when another process wrote or rotated it meanwhile.
//!
//! What a chain cannot show by itself: the *last* records of the newest file
//! removed or rewritten together (nothing after them holds their hash). Every
//! record is mirrored, with its sequence number and hash, to the process's log
//! (journald under systemd) by [`Auditor`], which a reader compares with the
//! file's tail.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The audit log's file name in the data directory, when no other is configured.
pub const DEFAULT_FILE: &str = "audit.jsonl";
/// A log file is rotated past this size…
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// …and this many rotated files are kept (`<file>.1` … `<file>.10`).
pub const DEFAULT_KEEP: u32 = 10;

/// The `prev` of the very first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hex SHA-256 of one record's line (without its newline).
pub fn hash_line(line: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = ring::digest::digest(&ring::digest::SHA256, line);
    let mut hex = String::with_capacity(64);
    for b in d.as_ref() {
        hex.push(HEX[(b >> 4) as usize] as char);
        hex.push(HEX[(b & 15) as usize] as char);
    }
    hex
}

/// The chain fields of a record; the rest of the line is the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub seq: u64,
    pub prev: String,
}

/// Where the chain stands: the last record's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {op}: {cause}")]
    Io {
        path: PathBuf,
        op: &'static str,
        cause: io::Error,
    },
    #[error("audit log {path}: its last record (line {line}) is not a record of this log ({why}); move the file aside to start a new chain")]
    BadTail {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> AuditError {
    let path = path.to_path_buf();
    move |cause| AuditError::Io { path, op, cause }
}

/// An audit log file being appended to.
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    /// The log's inode and size as this process last wrote it: another
    /// process appended or rotated when the path shows something else.
    ino: u64,
    size: u64,
    head: Head,
    /// `.<file>.lock`, held (flock) for the length of each append; taken out
    /// while locked.
    lock: Option<File>,
}

/// The last line of `file` and its 1-based number, if the file holds any.
fn last_line(file: &mut File) -> io::Result<Option<(usize, Vec<u8>)>> {
    file.seek(SeekFrom::Start(0))?;
    let mut last = None;
    let mut n = 0;
    for line in BufReader::new(&mut *file).split(b'\n') {
        let line = line?;
        n += 1;
        if !line.is_empty() {
            last = Some((n, line));
        }
    }
    Ok(last)
}

/// Opens the log file for appending (created 0600, never through a symlink).
fn open_log(path: &Path, create_new: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).append(true).mode(0o600);
    if create_new {
        o.create_new(true);
    } else {
        o.create(true);
    }
    o.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The last non-empty line of `file`, read from its end (records are short:
/// a few hundred bytes), or from the start when it is longer than the chunk.
fn tail_line(file: &mut File) -> io::Result<Option<Vec<u8>>> {
    const CHUNK: u64 = 64 * 1024;
    let len = file.metadata()?.len();
    let from = len.saturating_sub(CHUNK);
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity((len - from) as usize);
    file.take(CHUNK).read_to_end(&mut buf)?;
    while buf.last() == Some(&b'\n') {
        buf.pop();
    }
    match memchr::memrchr(b'\n', &buf) {
        Some(i) => Ok(Some(buf[i + 1..].to_vec())),
        None if from == 0 => Ok((!buf.is_empty()).then_some(buf)),
        None => Ok(last_line(file)?.map(|(_, l)| l)),
    }
}

/// The chain's head as `file` ends: its last record's sequence number and hash.
fn head_of(path: &Path, file: &mut File) -> Result<Head, AuditError> {
    match tail_line(file).map_err(io_err(path, "reading"))? {
        None => Ok(Head::genesis()),
        Some(bytes) => {
            let link: Link = serde_json::from_slice(&bytes).map_err(|e| AuditError::BadTail {
                path: path.to_path_buf(),
                line: last_line(file).ok().flatten().map_or(0, |(n, _)| n),
                why: e.to_string(),
            })?;
            Ok(Head {
                seq: link.seq,
                hash: hash_line(&bytes),
            })
        }
    }
}

impl AuditLog {
    /// Opens (or creates, 0600) `path` and continues its chain; a file whose
    /// last line is not a record is refused rather than silently forked.
    /// `max_bytes` 0: never rotate.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir, "creating its directory"))?;
        }
        let lock_path = lock_path(path);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "opening its lock"))?;
        let log = AuditLog {
            path: path.to_path_buf(),
            max_bytes,
            keep: keep.max(1),
            inner: Mutex::new(Inner {
                file: open_log(path, false).map_err(io_err(path, "opening"))?,
                ino: 0,
                size: 0,
                head: Head::genesis(),
                lock: Some(lock),
            }),
        };
        {
            let mut inner = log.lock_inner();
            let locked = log.flock(&mut inner)?;
            let r = log.catch_up(&mut inner, true);
            log.unflock(&mut inner, locked);
            r?;
        }
        Ok(log)
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the cross-process lock.
    fn flock(&self, inner: &mut Inner) -> Result<Flock<File>, AuditError> {
        let f = inner.lock.take().ok_or_else(|| AuditError::Io {
            path: lock_path(&self.path),
            op: "locking",
            cause: io::Error::other("the lock file was lost by an earlier failure"),
        })?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(f, e)| {
            inner.lock = Some(f);
            AuditError::Io {
                path: lock_path(&self.path),
                op: "locking",
                cause: e.into(),
            }
        })
    }

    fn unflock(&self, inner: &mut Inner, locked: Flock<File>) {
        inner.lock = Some(match locked.unlock() {
            Ok(f) => f,
            // Unlocking failed (it cannot for flock): closing the file drops
            // the lock; reopened at the next append.
            Err((l, _)) => match OpenOptions::new()
                .read(true)
                .write(true)
                .open(lock_path(&self.path))
            {
                Ok(f) => {
                    drop(l);
                    f
                }
                Err(_) => return,
            },
        });
    }

    /// Under the lock: when the log at `path` is not the file and size this
    /// process last wrote (another process appended or rotated), reopen it and
    /// take the chain's head from its tail.
    fn catch_up(&self, inner: &mut Inner, force: bool) -> Result<(), AuditError> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&self.path, "stat")(e)),
        };
        let same_file = meta.as_ref().is_some_and(|m| m.ino() == inner.ino);
        if !force && same_file && meta.as_ref().is_some_and(|m| m.len() == inner.size) {
            return Ok(());
        }
        if !same_file {
            inner.file = open_log(&self.path, false).map_err(io_err(&self.path, "opening"))?;
        }
        let m = inner.file.metadata().map_err(io_err(&self.path, "stat"))?;
        inner.ino = m.ino();
        inner.size = m.len();
        inner.head = if inner.size == 0 {
            // A new file after a rotation by another process continues the
            // chain of the rotated one.
            let rotated = numbered(&self.path, 1);
            match File::open(&rotated) {
                Ok(mut f) if !force || inner.head.seq == 0 => head_of(&rotated, &mut f)?,
                _ => inner.head.clone(),
            }
        } else {
            head_of(&self.path, &mut inner.file)?
        };
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` (a JSON object; its own `seq` and `prev` are replaced)
    /// as the next record, in one write. Returns the record's link and hash.
    pub fn append(&self, event: Map<String, Value>) -> Result<(Link, String), AuditError> {
        self.append_line(&event).map(|(link, hash, _)| (link, hash))
    }

    /// [`AuditLog::append`], also returning the record's line as written
    /// (without its newline).
    pub fn append_line(
        &self,
        event: &Map<String, Value>,
    ) -> Result<(Link, String, String), AuditError> {
        let mut inner = self.lock_inner();
        let locked = self.flock(&mut inner)?;
        let r = self.append_locked(&mut inner, event);
        self.unflock(&mut inner, locked);
        r
    }

    fn append_locked(
        &self,
        inner: &mut Inner,
        event: &Map<String, Value>,
    ) -> Result<(Link, String, String), AuditError> {
        self.catch_up(inner, false)?;
        if self.max_bytes > 0 && inner.size >= self.max_bytes {
            self.rotate(inner)?;
        }
        let link = Link {
            seq: inner.head.seq + 1,
            prev: inner.head.hash.clone(),
        };
        // `{"seq":…,"prev":"…",` then the event's own fields (its `seq` and
        // `prev`, if any, dropped).
        let encode = |e: &Map<String, Value>| {
            serde_json::to_vec(e).map_err(|e| AuditError::Io {
                path: self.path.clone(),
                op: "encoding a record",
                cause: io::Error::other(e),
            })
        };
        let fields = if event.contains_key("seq") || event.contains_key("prev") {
            let mut e = event.clone();
            e.remove("seq");
            e.remove("prev");
            encode(&e)?
        } else {
            encode(event)?
        };
        let mut line = format!("{{\"seq\":{},\"prev\":\"{}\"", link.seq, link.prev).into_bytes();
        if fields.len() > 2 {
            line.push(b',');
        }
        line.extend_from_slice(&fields[1..]);
        let hash = hash_line(&line);
        line.push(b'\n');
        inner
            .file
            .write_all(&line)
            .map_err(io_err(&self.path, "appending"))?;
        inner.size += line.len() as u64;
        inner.head = Head {
            seq: link.seq,
            hash: hash.clone(),
        };
        line.pop();
        let line = String::from_utf8(line).unwrap_or_default();
        Ok((link, hash, line))
    }

    /// `<file>.N` → `<file>.N+1` (the oldest past `keep` removed), `<file>` →
    /// `<file>.1`, a new `<file>`; the chain's head carries over.
    fn rotate(&self, inner: &mut Inner) -> Result<(), AuditError> {
        let numbered = |n: u32| numbered(&self.path, n);
        let _ = std::fs::remove_file(numbered(self.keep));
        for n in (1..self.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1)).map_err(io_err(&from, "rotating"))?;
            }
        }
        std::fs::rename(&self.path, numbered(1)).map_err(io_err(&self.path, "rotating"))?;
        inner.file =
            open_log(&self.path, true).map_err(io_err(&self.path, "opening after rotation"))?;
        inner.ino = inner
            .file
            .metadata()
            .map_err(io_err(&self.path, "stat"))?
            .ino();
        inner.size = 0;
        Ok(())
    }
}

/// `<file>.<n>`: a rotated log.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut p = path.to_path_buf().into_os_string();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// `.<file>.lock` beside the log.
fn lock_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.lock"))
}

/// Writes audit records: appends each to the log file when there is one, and
/// mirrors it — the whole record, its sequence number and hash — to the
/// process's log under the target `hands::audit` (on by default for the
/// worker). Every record gets the time and the worker's id.
pub struct Auditor {
    log: Option<AuditLog>,
    worker: String,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("file", &self.log.as_ref().map(AuditLog::path))
            .field("worker", &self.worker)
            .finish()
    }
}

impl Auditor {
    pub fn new(log: AuditLog, worker: impl Into<String>) -> Arc<Auditor> {
        Arc::new(Auditor {
            log: Some(log),
            worker: worker.into(),
        })
    }

    /// Records to the process's log only (a session outside any worker: tests,
    /// benchmarks).
    pub fn log_only(worker: impl Into<String>) -> Arc<Auditor> {
        Arc::new(Auditor {
            log: None,
            worker: worker.into(),
        })
    }

    /// The file records are appended to, if any.
    pub fn file(&self) -> Option<&Path> {
        self.log.as_ref().map(AuditLog::path)
    }

    /// Writes one record of `kind` (`call`, later `egress`, …) with `fields`.
    /// A record the file refuses (a full disk) is still in the process's log,
    /// whole, at error level: an audit record is never only lost.
    pub fn record(&self, kind: &str, fields: Map<String, Value>) {
        let mut event = Map::new();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        event.insert("time".into(), now.into());
        event.insert("kind".into(), kind.into());
        event.insert("worker".into(), self.worker.clone().into());
        event.extend(fields);
        let mirrored = tracing::enabled!(target: "hands::audit", tracing::Level::INFO);
        let Some(log) = &self.log else {
            if mirrored {
                let record = Value::Object(event).to_string();
                tracing::info!(target: "hands::audit", %record, "audit");
            }
            return;
        };
        match log.append_line(&event) {
            Ok((link, hash, record)) => {
                if mirrored {
                    tracing::info!(target: "hands::audit", seq = link.seq, %hash, %record, "audit");
                }
            }
            Err(e) => {
                let record = Value::Object(event).to_string();
                tracing::error!(target: "hands::audit", error = %e, %record, "audit record not written to the audit log");
            }
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The chain holds: `records` records, sequence `first..=last`.
    Holds { records: u64, first: u64, last: u64 },
    /// The first record that breaks the chain.
    Broken {
        file: PathBuf,
        line: usize,
        why: String,
    },
}

/// Checks the chain of `files`, oldest first (a rotated log: `f.2 f.1 f`). The
/// first record of the first file may continue an older chain (its `prev` is
/// taken as given) unless its sequence number is 1, which must start at
/// [`GENESIS`].
pub fn verify(files: &[PathBuf]) -> io::Result<Verdict> {
    let mut head: Option<Head> = None;
    let mut records = 0;
    let mut first = 0;
    for file in files {
        let mut text = Vec::new();
        File::open(file)?.read_to_end(&mut text)?;
        let lines: Vec<(usize, &[u8])> = text
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .collect();
        // Whether a record of sequence `seq` comes later in this file.
        let later = |from: usize, seq: u64| {
            lines[from..]
                .iter()
                .any(|(_, l)| serde_json::from_slice::<Link>(l).is_ok_and(|k| k.seq == seq))
        };
        for (k, &(i, line)) in lines.iter().enumerate() {
            let broken = |why: String| Verdict::Broken {
                file: file.clone(),
                line: i + 1,
                why,
            };
            let link: Link = match serde_json::from_slice(line) {
                Ok(l) => l,
                Err(e) => return Ok(broken(format!("not a record ({e})"))),
            };
            match &head {
                None => {
                    if link.seq == 1 && link.prev != GENESIS {
                        return Ok(broken("the first record does not start the chain".into()));
                    }
                    first = link.seq;
                }
                Some(h) => {
                    let expected = h.seq + 1;
                    if link.seq < expected {
                        return Ok(broken(format!(
                            "sequence {} after {}: a record was inserted or the records were reordered",
                            link.seq, h.seq
                        )));
                    }
                    if link.seq > expected && later(k, expected) {
                        return Ok(broken(format!(
                            "sequence {} after {}: the records were reordered (sequence {expected} comes later)",
                            link.seq, h.seq
                        )));
                    }
                    if link.seq > expected {
                        return Ok(broken(format!(
                            "sequence {} after {}: {} record(s) deleted before it",
                            link.seq,
                            h.seq,
                            link.seq - expected
                        )));
                    }
                    if link.prev != h.hash {
                        return Ok(broken(format!(
                            "the hash of the record before it (sequence {}) does not match: that record was edited, or this one inserted",
                            h.seq
                        )));
                    }
                }
            }
            head = Some(Head {
                seq: link.seq,
                hash: hash_line(line),
            });
            records += 1;
        }
    }
    Ok(Verdict::Holds {
        records,
        first,
        last: head.map(|h| h.seq).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_s_hash_is_its_sha256_in_lower_case_hex() {
        assert_eq!(
            hash_line(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn event(n: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("tool".into(), "bash".into());
        m.insert("call_id".into(), format!("c{n}").into());
        m
    }

    fn write(path: &Path, n: u64) {
        let log = AuditLog::open(path, 0, 3).unwrap();
        for i in 0..n {
            log.append(event(i)).unwrap();
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn put(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    fn broken_at(path: &Path) -> (usize, String) {
        match verify(&[path.to_path_buf()]).unwrap() {
            Verdict::Broken { line, why, .. } => (line, why),
            v => panic!("the chain held: {v:?}"),
        }
    }

    #[test]
    fn a_chain_holds_and_continues_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        write(&p, 3);
        write(&p, 2);
        assert_eq!(
            verify(std::slice::from_ref(&p)).unwrap(),
            Verdict::Holds {
                records: 5,
                first: 1,
                last: 5
            }
        );
        let first: Link = serde_json::from_str(&lines(&p)[0]).unwrap();
        assert_eq!(
            first,
            Link {
                seq: 1,
                prev: GENESIS.into()
            }
        );
    }

    #[test]
    fn an_edited_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write(&p, 5);
        let mut l = lines(&p);
        l[1] = l[1].replace("\"c1\"", "\"c9\"");
        put(&p, &l);
        let (line, why) = broken_at(&p);
        assert_eq!(line, 3, "{why}");
        assert!(why.contains("edited"), "{why}");
    }

    #[test]
    fn a_deleted_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write(&p, 5);
        let mut l = lines(&p);
        l.remove(2);
        put(&p, &l);
        let (line, why) = broken_at(&p);
        assert_eq!(line, 3, "{why}");
        assert!(why.contains("deleted"), "{why}");
    }

    #[test]
    fn an_inserted_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write(&p, 5);
        let mut l = lines(&p);
        // A forged record with the right sequence number and prev hash: the
        // record after it no longer matches.
        let forged =
            serde_json::json!({"seq": 3, "prev": hash_line(l[1].as_bytes()), "tool": "read"});
        l.insert(2, forged.to_string());
        put(&p, &l);
        let (line, why) = broken_at(&p);
        assert_eq!(line, 4, "{why}");
        assert!(why.contains("inserted"), "{why}");
    }

    #[test]
    fn reordered_records_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write(&p, 5);
        let mut l = lines(&p);
        l.swap(1, 2);
        put(&p, &l);
        let (line, why) = broken_at(&p);
        assert_eq!(line, 2, "{why}");
        assert!(why.contains("reordered"), "{why}");
    }

    #[test]
    fn rotation_keeps_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&p, 300, 5).unwrap();
        for i in 0..20 {
            log.append(event(i)).unwrap();
        }
        let mut files: Vec<PathBuf> = (1..=5)
            .rev()
            .map(|n| dir.path().join(format!("audit.jsonl.{n}")))
            .filter(|f| f.exists())
            .collect();
        assert!(files.len() >= 3, "{files:?}");
        files.push(p.clone());
        match verify(&files).unwrap() {
            Verdict::Holds { last, .. } => assert_eq!(last, 20),
            v => panic!("{v:?}"),
        }
        // The newest file alone verifies too (its first record continues the
        // older chain), and out of order the files do not.
        assert!(matches!(
            verify(std::slice::from_ref(&p)).unwrap(),
            Verdict::Holds { .. }
        ));
        files.swap(0, 1);
        assert!(matches!(verify(&files).unwrap(), Verdict::Broken { .. }));
    }

    #[test]
    fn two_writers_of_one_log_keep_one_chain_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        // Two handles: two processes appending to one log.
        let a = AuditLog::open(&p, 400, 20).unwrap();
        let b = AuditLog::open(&p, 400, 20).unwrap();
        for i in 0..30 {
            let w = if i % 3 == 0 { &b } else { &a };
            let (link, _) = w.append(event(i)).unwrap();
            assert_eq!(link.seq, i + 1);
        }
        let mut files: Vec<PathBuf> = (1..=20)
            .rev()
            .map(|n| numbered(&p, n))
            .filter(|f| f.exists())
            .collect();
        assert!(files.len() >= 3, "{files:?}");
        files.push(p.clone());
        assert_eq!(
            verify(&files).unwrap(),
            Verdict::Holds {
                records: 30,
                first: 1,
                last: 30
            }
        );
    }

    #[test]
    fn a_log_whose_tail_is_not_a_record_is_not_forked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write(&p, 2);
        let mut l = lines(&p);
        l.push("garbage".into());
        put(&p, &l);
        let e = AuditLog::open(&p, 0, 3).err().unwrap().to_string();
        assert!(e.contains("line 3"), "{e}");
    }
}

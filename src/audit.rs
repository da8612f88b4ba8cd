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
//! What a chain cannot show by itself: the *last* records of the newest file
//! removed or rewritten together (nothing after them holds their hash). The
//! worker mirrors every record's sequence number and hash to its log (journald
//! under systemd), which a reader compares with the file's tail.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The `prev` of the very first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hex SHA-256 of one record's line (without its newline).
pub fn hash_line(line: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, line);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
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
    size: u64,
    head: Head,
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

impl AuditLog {
    /// Opens (or creates, 0600) `path` and continues its chain; a file whose
    /// last line is not a record is refused rather than silently forked.
    /// `max_bytes` 0: never rotate.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<AuditLog, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir, "creating its directory"))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path, "opening"))?;
        let head = match last_line(&mut file).map_err(io_err(path, "reading"))? {
            None => Head::genesis(),
            Some((line, bytes)) => {
                let link: Link =
                    serde_json::from_slice(&bytes).map_err(|e| AuditError::BadTail {
                        path: path.to_path_buf(),
                        line,
                        why: e.to_string(),
                    })?;
                Head {
                    seq: link.seq,
                    hash: hash_line(&bytes),
                }
            }
        };
        let size = file.metadata().map_err(io_err(path, "stat"))?.len();
        Ok(AuditLog {
            path: path.to_path_buf(),
            max_bytes,
            keep: keep.max(1),
            inner: Mutex::new(Inner { file, size, head }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` (a JSON object; its own `seq` and `prev` are replaced)
    /// as the next record, in one write. Returns the record's link and hash.
    pub fn append(&self, event: Map<String, Value>) -> Result<(Link, String), AuditError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if self.max_bytes > 0 && inner.size >= self.max_bytes {
            self.rotate(&mut inner)?;
        }
        let link = Link {
            seq: inner.head.seq + 1,
            prev: inner.head.hash.clone(),
        };
        let mut record = Map::new();
        record.insert("seq".into(), link.seq.into());
        record.insert("prev".into(), link.prev.clone().into());
        for (k, v) in event {
            if k != "seq" && k != "prev" {
                record.insert(k, v);
            }
        }
        let mut line = serde_json::to_vec(&Value::Object(record)).map_err(|e| AuditError::Io {
            path: self.path.clone(),
            op: "encoding a record",
            cause: io::Error::other(e),
        })?;
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
        Ok((link, hash))
    }

    /// `<file>.N` → `<file>.N+1` (the oldest past `keep` removed), `<file>` →
    /// `<file>.1`, a new `<file>`; the chain's head carries over.
    fn rotate(&self, inner: &mut Inner) -> Result<(), AuditError> {
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        let _ = std::fs::remove_file(numbered(self.keep));
        for n in (1..self.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1)).map_err(io_err(&from, "rotating"))?;
            }
        }
        std::fs::rename(&self.path, numbered(1)).map_err(io_err(&self.path, "rotating"))?;
        use std::os::unix::fs::OpenOptionsExt;
        inner.file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(io_err(&self.path, "opening after rotation"))?;
        inner.size = 0;
        Ok(())
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

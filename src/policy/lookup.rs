//! Where environments come from: the one lookup every command uses (`hands
//! worker`, `exec`, `tool`, `doctor`, `demo`, `bench`, `policy list`).
//!
//! Directories are searched in this order, and the first `<name>.toml` found
//! defines environment `name`:
//!
//! 1. each `--policy-dir` given on the command line, in order;
//! 2. `$HANDS_POLICY_DIR`;
//! 3. the worker configuration's `policy_dirs`, relative to the configuration
//!    file's directory (only commands that read one: `hands worker`,
//!    `hands policy list --config`);
//! 4. `/etc/hands/policies`;
//! 5. the policies built into the binary (`default`, `strict`, `build`, `packages`).
//!
//! A setting given at run time thus wins over one written in a file, and the
//! operator's files over the built-in copies.
//!
//! Every `*.toml` file of every directory is loaded and validated, not only the
//! one a command asks for: an invalid file anywhere is an error naming the
//! file and the key, so an environment never silently disappears and a broken
//! file never waits for the day it is first used. Hidden files (editor locks
//! such as `.#default.toml`) and files of other extensions are ignored. A
//! directory named explicitly (1–3) must exist; `/etc/hands/policies` may be
//! absent.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::{is_valid_name, Policy, PolicyError, BUILTIN};

/// The system-wide policy directory.
pub const SYSTEM_DIR: &str = "/etc/hands/policies";

/// The environment variable naming a policy directory.
pub const ENV_VAR: &str = "HANDS_POLICY_DIR";

/// Why a directory is in the lookup; said in errors and by `hands policy list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--policy-dir`.
    Flag,
    /// `$HANDS_POLICY_DIR`.
    EnvVar,
    /// `policy_dirs` of a worker configuration file.
    Config(PathBuf),
    /// `/etc/hands/policies`, which may be absent.
    System,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag => f.write_str("--policy-dir"),
            Origin::EnvVar => write!(f, "${ENV_VAR}"),
            Origin::Config(file) => write!(f, "policy_dirs of {}", file.display()),
            Origin::System => f.write_str("the system policy directory"),
        }
    }
}

/// One directory of the lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDir {
    pub path: PathBuf,
    pub origin: Origin,
}

/// Where a loaded environment's policy came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    BuiltIn,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::BuiltIn => f.write_str("built in"),
        }
    }
}

/// The directories environments are looked up in, in order (the built-in
/// policies come after the last one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lookup {
    dirs: Vec<PolicyDir>,
}

impl Lookup {
    /// The lookup of a command: `--policy-dir` flags, `$HANDS_POLICY_DIR`,
    /// `/etc/hands/policies`.
    pub fn from_command_line(flags: &[PathBuf]) -> Lookup {
        let env = std::env::var_os(ENV_VAR)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        Lookup::new(flags, env, Some(PathBuf::from(SYSTEM_DIR)))
    }

    /// A lookup of the given directories; `system` stands for
    /// `/etc/hands/policies` (tests pass another directory, or none).
    pub fn new(flags: &[PathBuf], env: Option<PathBuf>, system: Option<PathBuf>) -> Lookup {
        let mut dirs: Vec<PolicyDir> = flags
            .iter()
            .map(|p| PolicyDir {
                path: p.clone(),
                origin: Origin::Flag,
            })
            .collect();
        dirs.extend(env.map(|path| PolicyDir {
            path,
            origin: Origin::EnvVar,
        }));
        dirs.extend(system.map(|path| PolicyDir {
            path,
            origin: Origin::System,
        }));
        Lookup { dirs }
    }

    /// Only the built-in policies.
    pub fn builtin_only() -> Lookup {
        Lookup::default()
    }

    /// This lookup with a configuration file's `policy_dirs` (relative ones
    /// taken from the file's directory) after the command line's directories
    /// and before the system one.
    pub fn with_config_dirs(&self, file: &Path, dirs: &[PathBuf]) -> Lookup {
        let base = file.parent().unwrap_or(Path::new("."));
        let at = self
            .dirs
            .iter()
            .position(|d| d.origin == Origin::System)
            .unwrap_or(self.dirs.len());
        let mut all = self.dirs.clone();
        let from_file = dirs.iter().map(|d| PolicyDir {
            path: base.join(d),
            origin: Origin::Config(file.to_path_buf()),
        });
        all.splice(at..at, from_file);
        Lookup { dirs: all }
    }

    /// The directories, in lookup order.
    pub fn dirs(&self) -> &[PolicyDir] {
        &self.dirs
    }

    /// Loads and validates every policy of every directory, then the built-in
    /// ones. The first file of a name wins; later ones (and built-in copies)
    /// are recorded as shadowed.
    pub fn load(&self) -> Result<Catalog, PolicyError> {
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for dir in &self.dirs {
            for path in policy_files(dir)? {
                let policy = Policy::load(&path)?;
                let source = Source::File(path);
                match entries.get_mut(&policy.name) {
                    Some(first) => first.shadows.push(source),
                    None => {
                        entries.insert(
                            policy.name.clone(),
                            Entry {
                                policy,
                                source,
                                shadows: Vec::new(),
                            },
                        );
                    }
                }
            }
        }
        for (name, _) in BUILTIN {
            let Some(policy) = super::builtin(name) else {
                continue;
            };
            // Every built-in policy is parsed by the unit tests; an error here
            // is a build that was never tested, and is reported as any other.
            let policy = policy?;
            match entries.get_mut(name) {
                Some(first) => first.shadows.push(Source::BuiltIn),
                None => {
                    entries.insert(
                        name.to_string(),
                        Entry {
                            policy,
                            source: Source::BuiltIn,
                            shadows: Vec::new(),
                        },
                    );
                }
            }
        }
        Ok(Catalog {
            entries,
            searched: self.dirs.iter().map(|d| d.path.clone()).collect(),
        })
    }
}

/// The `*.toml` files of `dir`, in name order; hidden files skipped.
fn policy_files(dir: &PolicyDir) -> Result<Vec<PathBuf>, PolicyError> {
    let unreadable = |cause: io::Error| PolicyError::Dir {
        path: dir.path.clone(),
        origin: dir.origin.clone(),
        cause,
    };
    let entries = match std::fs::read_dir(&dir.path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.origin == Origin::System => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(unreadable(e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(unreadable)?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && path.extension().is_some_and(|e| e == "toml") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// One environment as the lookup found it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub policy: Policy,
    /// The file that defines it.
    pub source: Source,
    /// Files of the same name further down the lookup (and the built-in copy),
    /// which this one hides.
    pub shadows: Vec<Source>,
}

/// Every environment the lookup found, by name.
#[derive(Debug, Clone)]
pub struct Catalog {
    entries: BTreeMap<String, Entry>,
    searched: Vec<PathBuf>,
}

impl Catalog {
    /// Environment `name`.
    pub fn get(&self, name: &str) -> Result<&Entry, PolicyError> {
        // Checked first so that a name like `../x` is reported as invalid
        // rather than as missing.
        if !is_valid_name(name) {
            return Err(PolicyError::Name {
                path: None,
                name: name.to_string(),
            });
        }
        self.entries.get(name).ok_or_else(|| PolicyError::NotFound {
            name: name.to_string(),
            searched: self.searched.clone(),
        })
    }

    /// The policy of environment `name`.
    pub fn policy(&self, name: &str) -> Result<Policy, PolicyError> {
        self.get(name).map(|e| e.policy.clone())
    }

    /// Every environment, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = include_str!("../../policies/default.toml");

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_first_file_of_a_name_wins_and_the_rest_are_shadowed() {
        let flag = tempfile::tempdir().unwrap();
        let env = tempfile::tempdir().unwrap();
        let system = tempfile::tempdir().unwrap();
        let a = write(
            flag.path(),
            "default.toml",
            &VALID.replace("pids = 512", "pids = 64"),
        );
        let b = write(env.path(), "default.toml", VALID);
        write(env.path(), "custom.toml", VALID);
        write(system.path(), ".#default.toml", "garbage");
        write(system.path(), "notes.txt", "garbage");
        let lookup = Lookup::new(
            &[flag.path().to_path_buf()],
            Some(env.path().to_path_buf()),
            Some(system.path().to_path_buf()),
        );
        let catalog = lookup.load().unwrap();
        let default = catalog.get("default").unwrap();
        assert_eq!(default.policy.limits.pids, 64);
        assert_eq!(default.source, Source::File(a));
        assert_eq!(default.shadows, [Source::File(b), Source::BuiltIn]);
        assert_eq!(catalog.get("strict").unwrap().source, Source::BuiltIn);
        let names: Vec<&str> = catalog.iter().map(|e| e.policy.name.as_str()).collect();
        assert_eq!(names, ["build", "custom", "default", "packages", "strict"]);
        assert!(matches!(
            catalog.get("nope"),
            Err(PolicyError::NotFound { .. })
        ));
        assert!(matches!(
            catalog.get("../x"),
            Err(PolicyError::Name { path: None, .. })
        ));
    }

    #[test]
    fn an_invalid_file_anywhere_fails_the_lookup_naming_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "good.toml", VALID);
        let bad = write(
            dir.path(),
            "bad.toml",
            &VALID.replace("memory = \"1GiB\"", "memory = \"1GB\""),
        );
        let error = Lookup::new(&[], Some(dir.path().to_path_buf()), None)
            .load()
            .unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("{}: limits.memory: ", bad.display())),
            "{message}"
        );
    }

    #[test]
    fn named_directories_must_exist_the_system_one_need_not() {
        let missing = PathBuf::from("/nonexistent/hands-policies");
        let lookup = Lookup::new(&[], None, Some(missing.clone()));
        assert_eq!(lookup.load().unwrap().len(), BUILTIN.len());
        let error = Lookup::new(std::slice::from_ref(&missing), None, None)
            .load()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "policy directory /nonexistent/hands-policies (from --policy-dir): \
             No such file or directory (os error 2)"
        );
        // Printed once, whatever prints the chain.
        assert!(std::error::Error::source(&error).is_none());
    }

    #[test]
    fn config_dirs_come_after_the_command_line_and_before_the_system_dir() {
        let lookup = Lookup::new(
            &[PathBuf::from("/flag")],
            Some(PathBuf::from("/env")),
            Some(PathBuf::from("/sys-dir")),
        )
        .with_config_dirs(
            Path::new("/etc/hands/worker.toml"),
            &[PathBuf::from("local"), PathBuf::from("/abs")],
        );
        let paths: Vec<&Path> = lookup.dirs().iter().map(|d| d.path.as_path()).collect();
        assert_eq!(
            paths,
            [
                Path::new("/flag"),
                Path::new("/env"),
                Path::new("/etc/hands/local"),
                Path::new("/abs"),
                Path::new("/sys-dir"),
            ]
        );
        assert_eq!(
            lookup.dirs()[2].origin,
            Origin::Config(PathBuf::from("/etc/hands/worker.toml"))
        );
    }
}

//! Advisory locks (flock) that keep two processes from writing the same part of a cache.
//!
//! - one lock per worker (`locks/worker-I-of-N.lock`, held for the whole run, never
//!   waited on: a second process for the same worker is refused);
//! - one lock for the manifest (`locks/manifest.lock`, held only while it is read,
//!   updated and replaced);
//! - one lock per training run directory (`RUN_DIR/train.lock`, [`RunLock`], held while a
//!   `train` process writes the run; it holds the holder's pid for the message a second
//!   process gets).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot create lock file {path}: {source}; choose a writable --out")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another logitcache process is writing worker {worker} of {dir} (lock {path} is held); wait for it to finish, or stop it before resuming"
    )]
    Busy {
        dir: PathBuf,
        worker: String,
        path: PathBuf,
    },
    #[error(
        "another logitcache process ({holder}) is training {dir} (lock {path} is held); wait for it to finish, or stop it before resuming"
    )]
    RunBusy {
        dir: PathBuf,
        holder: String,
        path: PathBuf,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn open(path: &Path) -> Result<File, LockError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| LockError::Create {
            path: path.to_path_buf(),
            source: e,
        })?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| LockError::Create {
            path: path.to_path_buf(),
            source: e,
        })
}

/// Held by a teacher run for its worker slot; released on drop.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

/// Opens `path` and locks it without waiting: `None` when another process holds it.
fn try_hold(path: &Path) -> Result<Option<File>, LockError> {
    let file = open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(LockError::Lock {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

impl CacheLock {
    pub fn acquire(dir: &Path, worker_index: usize, num_workers: usize) -> Result<Self, LockError> {
        let path = dir
            .join("locks")
            .join(format!("worker-{worker_index}-of-{num_workers}.lock"));
        match try_hold(&path)? {
            Some(file) => Ok(CacheLock { _file: file }),
            None => Err(LockError::Busy {
                dir: dir.to_path_buf(),
                worker: format!("{worker_index}/{num_workers}"),
                path,
            }),
        }
    }
}

/// Held while the manifest is read-modified-written; released on drop.
#[derive(Debug)]
pub struct ManifestLock {
    _file: File,
}

impl ManifestLock {
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join("locks").join("manifest.lock");
        let file = open(&path)?;
        file.lock()
            .map_err(|e| LockError::Lock { path, source: e })?;
        Ok(ManifestLock { _file: file })
    }
}

/// The "pid N" line a held `train.lock` records.
fn holder_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "pid unknown".into())
}

/// Held by a `train` process for its run directory; released on drop (and by the kernel
/// when the process dies, so a killed run never leaves a stale lock).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Locks `run/train.lock` without waiting, recording this process's pid in it.
    pub fn acquire(run: &Path) -> Result<Self, LockError> {
        use std::io::{Seek, Write};
        let path = run.join("train.lock");
        let Some(mut file) = try_hold(&path)? else {
            return Err(LockError::RunBusy {
                dir: run.to_path_buf(),
                holder: holder_line(&path),
                path,
            });
        };
        let pid = format!("pid {}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| LockError::Lock {
                path: path.clone(),
                source: e,
            })?;
        Ok(RunLock { _file: file })
    }

    /// Who holds `run/train.lock` now (its "pid N" line), or `None` when no `train` is
    /// writing the run. Creates nothing: for readers (eval, export) that failed and want to
    /// say whether a training process was changing the run under them.
    pub fn holder(run: &Path) -> Option<String> {
        let path = run.join("train.lock");
        let file = File::open(&path).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None,
            Err(std::fs::TryLockError::WouldBlock) => Some(holder_line(&path)),
            Err(std::fs::TryLockError::Error(_)) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("train.lock"),
            "{e}"
        );
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}

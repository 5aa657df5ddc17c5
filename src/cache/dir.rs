//! A cache directory on disk: preparing it, recognising what in it belongs to no manifest
//! (stray shards, temporary files of a killed run), and finding the shards that are
//! finished (present with the manifest's sha256 and length).
//!
//! Layout: `DIR/manifest.json` ([`super::manifest`]), `DIR/shards/shard-NNNNNN.parquet`
//! ([`super::manifest::shard_file_name`]), written as `….parquet.tmp-PID` and renamed, and
//! the lock files of [`super::lock`].

use super::manifest::{Manifest, shard_file_name};
use crate::util::sha256_file;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Folder of the shard files inside a cache directory.
pub const SHARDS_DIR: &str = "shards";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("--out {0} exists and is not a directory; choose a directory for the cache")]
    NotADirectory(PathBuf),
    #[error("cannot create the cache directory {path} ({source}); choose a writable --out")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list {path} ({source}); check the cache directory's permissions and disk")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} has shard files but no manifest.json; it is not a cache this run can resume: use an empty --out"
    )]
    StrayShards(PathBuf),
}

/// Creates `out` and `out/shards` if needed.
pub fn prepare(out: &Path) -> Result<(), DirError> {
    if out.exists() && !out.is_dir() {
        return Err(DirError::NotADirectory(out.to_path_buf()));
    }
    std::fs::create_dir_all(out.join(SHARDS_DIR)).map_err(|source| DirError::Create {
        path: out.to_path_buf(),
        source,
    })
}

fn shard_dir_entries(out: &Path) -> Result<Vec<std::fs::DirEntry>, DirError> {
    let dir = out.join(SHARDS_DIR);
    let list = |source| DirError::List {
        path: dir.clone(),
        source,
    };
    std::fs::read_dir(&dir)
        .map_err(list)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(list)
}

/// Refuses a directory without a manifest that already holds shard files (they belong to
/// no cache this run could resume).
pub fn refuse_stray_shards(out: &Path) -> Result<(), DirError> {
    let stray = shard_dir_entries(out)?
        .iter()
        .any(|e| e.path().extension().is_some_and(|x| x == "parquet"));
    if stray {
        return Err(DirError::StrayShards(out.to_path_buf()));
    }
    Ok(())
}

/// Removes the temporary files a killed run left for shard `index`.
pub fn remove_temporaries(out: &Path, index: u64) -> Result<(), DirError> {
    let target = out.join(shard_file_name(index));
    let prefix = format!(
        "{}.tmp-",
        target
            .file_name()
            .expect("shard file name: this is a bug")
            .to_string_lossy()
    );
    for e in shard_dir_entries(out)? {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// The shards of `manifest` present in `out` with their recorded sha256 and length; a
/// missing or damaged one is logged and left out (so it is computed again).
pub fn finished_shards(out: &Path, manifest: &Manifest) -> BTreeSet<u64> {
    let mut done = BTreeSet::new();
    for s in &manifest.shards {
        match sha256_file(&out.join(&s.file)) {
            Ok((sha, n)) if sha == s.sha256 && n == s.bytes => {
                done.insert(s.index);
            }
            _ => tracing::warn!("shard {} is missing or damaged; computing it again", s.file),
        }
    }
    done
}

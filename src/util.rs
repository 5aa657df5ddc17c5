//! Small helpers shared by the stages: hashing, durable writes.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;

/// sha256 (hex) and length of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// sha256 (hex) of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Fsyncs a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    // `Path::new("m.onnx").parent()` is the empty path: the current directory.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename over `path`, fsync the directory. Readers see the old or the new content, never a
/// mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes, streamed to the file (through a 1 MiB buffer)
/// rather than held whole. If anything fails, the temporary file is removed and `path` is
/// left as it was.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .expect("write_atomic target has a file name: this is a bug")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        write(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Kills this process with SIGKILL when the environment variable `LOGITCACHE_FAILPOINT`
/// names `point` (format `point` or `point:N`, dying on the N-th hit). Used by the crash
/// tests to stop the writer at exact moments; costs one env lookup per call otherwise.
pub fn failpoint(point: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("LOGITCACHE_FAILPOINT") else {
        return;
    };
    let (name, nth) = match spec.split_once(':') {
        Some((n, c)) => (n.to_string(), c.parse::<u64>().unwrap_or(1)),
        None => (spec.clone(), 1),
    };
    if name == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Lowers the calling thread's scheduling priority (Linux `nice` 10; elsewhere nothing).
/// For the teacher's tokenising and writing threads: where the teacher keeps every core
/// busy they run in its gaps instead of preempting one of its threads, which would stall
/// the others at the next barrier; on spare cores they run as before.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours; on
    // failure the thread keeps its priority, which is harmless.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// CPU seconds the calling thread has used (Linux and other Unixes; 0 where unknown).
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc == 0 {
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    } else {
        0.0
    }
}

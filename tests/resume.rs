//! Crash safety, resumption and work split: a run killed (SIGKILL) at any point and resumed,
//! or split across workers, gives the same content as one uninterrupted run.

use crate::util::*;
use logitcache::cache::manifest::Manifest;
use std::io::BufRead;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;

const DOCS: usize = 150;

fn args_for(out: &std::path::Path) -> Vec<String> {
    teacher_args(&plain_model(), out, DOCS)
}

/// The uninterrupted run everything is compared with.
fn reference() -> &'static PathBuf {
    static REF: OnceLock<PathBuf> = OnceLock::new();
    REF.get_or_init(|| {
        let out = shared_dir().join("resume-reference");
        assert_ok(&run_strings(&args_for(&out)));
        let m = Manifest::load(&out).unwrap();
        assert!(
            m.plan.shards >= 6,
            "want several shards, got {}",
            m.plan.shards
        );
        out
    })
}

fn assert_same_content(out: &std::path::Path) {
    assert_ok(&run(&["verify", out.to_str().unwrap()]));
    let (a, b) = (all_rows(reference()), all_rows(out));
    assert_eq!(a.seq_ids, b.seq_ids);
    assert_eq!(a.input_ids, b.input_ids);
    assert_eq!(a.topk_ids, b.topk_ids);
    assert_eq!(a.topk_logprobs, b.topk_logprobs);
    assert_eq!(a.tail_logprob, b.tail_logprob);
    let leftovers: Vec<_> = std::fs::read_dir(out.join("shards"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn killed_at_each_failpoint_then_resumed() {
    reference();
    for point in [
        "shard-written:2",
        "shard-renamed:3",
        "manifest-updated:2",
        "shard-written:1",
    ] {
        let out = shared_dir().join(format!("resume-{}", point.replace(':', "-")));
        let _ = std::fs::remove_dir_all(&out);
        let args = args_for(&out);
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = run_env(&refs, &[("LOGITCACHE_FAILPOINT", point)]);
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{point}: expected SIGKILL, got {:?}: {}",
            o.status,
            stderr(&o)
        );
        // A killed cache is never mistaken for a complete one.
        let v = run(&["verify", out.to_str().unwrap()]);
        assert_eq!(v.status.code(), Some(1), "{point}: {}", stdout(&v));
        // The shards the manifest lists as finished, with each file's inode and mtime.
        let finished = |out: &std::path::Path| {
            use std::os::unix::fs::MetadataExt;
            Manifest::load(out)
                .unwrap()
                .shards
                .iter()
                .map(|s| {
                    let md = std::fs::metadata(out.join(&s.file)).unwrap();
                    (s.file.clone(), md.ino(), md.mtime_nsec(), s.sha256.clone())
                })
                .collect::<Vec<_>>()
        };
        let before = finished(&out);
        // Killed inside the first shard, nothing is finished; otherwise something is.
        assert_eq!(
            before.is_empty(),
            point == "shard-written:1",
            "{point}: {before:?}"
        );
        let o = run_strings(&args);
        assert_ok(&o);
        let m = Manifest::load(&out).unwrap();
        assert!(m.totals.complete);
        // Finished shards were kept, not recomputed: same file, same entry.
        let after = finished(&out);
        for b in &before {
            assert!(after.contains(b), "{point}: {} was rewritten", b.0);
        }
        assert_same_content(&out);
    }
}

#[test]
fn killed_at_a_random_moment_then_resumed() {
    reference();
    let out = shared_dir().join("resume-timed");
    let _ = std::fs::remove_dir_all(&out);
    let mut args = args_for(&out);
    let p = args.iter().position(|a| a == "off").unwrap();
    args[p] = "json".into();
    let mut child = command()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("\"event\":\"shard\""), "{first}");
    child.kill().unwrap(); // SIGKILL, somewhere inside the next shard
    child.wait().unwrap();
    let m = Manifest::load(&out).unwrap();
    let kept: Vec<(u64, String)> = m
        .shards
        .iter()
        .map(|s| (s.index, s.sha256.clone()))
        .collect();
    assert!(!m.totals.complete && !kept.is_empty());
    // A file's identity: a rewrite (even of the same bytes, as a deterministic recompute
    // would make) gets a new inode through the temporary-file rename, and a new mtime.
    let identity = |file: &str| {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(out.join(file)).unwrap();
        (md.ino(), md.mtime(), md.mtime_nsec())
    };
    let files: Vec<String> = m.shards.iter().map(|s| s.file.clone()).collect();
    let before: Vec<_> = files.iter().map(|f| identity(f)).collect();
    // One finished shard is damaged while the run is down: it alone is computed again.
    let damaged = m.shards[0].file.clone();
    let mut bytes = std::fs::read(out.join(&damaged)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x04;
    std::fs::write(out.join(&damaged), &bytes).unwrap();
    let before_damaged = identity(&damaged);
    let o = run_strings(&args_for(&out));
    assert_ok(&o);
    assert!(
        stderr(&o).contains(&format!(
            "shard {damaged} is missing or damaged; computing it again"
        )),
        "{}",
        stderr(&o)
    );
    let m = Manifest::load(&out).unwrap();
    for (i, sha) in kept {
        let s = m.shards.iter().find(|s| s.index == i).unwrap();
        assert_eq!(s.sha256, sha, "shard {i} was rewritten");
    }
    for (f, was) in files.iter().zip(&before) {
        if *f != damaged {
            assert_eq!(identity(f), *was, "finished shard {f} was rewritten");
        }
    }
    assert_ne!(
        identity(&damaged),
        before_damaged,
        "{damaged} was not recomputed"
    );
    assert_same_content(&out);
}

#[test]
fn concurrent_workers_make_the_same_cache() {
    reference();
    let out = shared_dir().join("workers");
    let _ = std::fs::remove_dir_all(&out);
    let children: Vec<_> = (0..3)
        .map(|i| {
            let mut a = args_for(&out);
            let t = a.iter().position(|x| x == "--threads").unwrap();
            a[t + 1] = "1".into();
            a.extend([
                "--worker-index".into(),
                i.to_string(),
                "--num-workers".into(),
                "3".into(),
            ]);
            command().args(&a).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert_ok(&o);
    }
    let m = Manifest::load(&out).unwrap();
    assert!(m.totals.complete);
    for s in &m.shards {
        assert_eq!(s.worker, format!("{}/3", s.index % 3));
    }
    assert_same_content(&out);
}

#[test]
fn scheduler_environment_picks_the_worker() {
    let out = shared_dir().join("slurm");
    let _ = std::fs::remove_dir_all(&out);
    let args = args_for(&out);
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert_ok(&run_env(
        &refs,
        &[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ],
    ));
    let m = Manifest::load(&out).unwrap();
    assert!(!m.totals.complete && !m.shards.is_empty());
    assert!(
        m.shards
            .iter()
            .all(|s| s.index % 2 == 1 && s.worker == "1/2")
    );
    let o = run_env(&refs, &[("JOB_COMPLETION_INDEX", "0")]);
    assert_fails(&o, &["JOB_COMPLETION_INDEX is set", "pass --num-workers N"]);
    let mut k8s = args.clone();
    k8s.extend(["--num-workers".into(), "2".into()]);
    let refs: Vec<&str> = k8s.iter().map(|s| s.as_str()).collect();
    assert_ok(&run_env(&refs, &[("JOB_COMPLETION_INDEX", "0")]));
    assert!(Manifest::load(&out).unwrap().totals.complete);
}

#!/usr/bin/env python3
"""Cache fidelity against full-logit KD: one demo teacher, every cache mode, one student.

Builds, from the demo's largest teacher (t-144, V = 2048) and its corpus: the exact cache
(top-k = V, the whole distribution: full-logit KD), top-k at k = 8 and 64, sample at
N = 16 and 50, and a hybrid (exact top-8 + 42 tail draws), and variants of these with q8
log-probs and a flatter proposal (τ = 1.5); trains the demo's s-48 student
from each with KD only and with KD + CE for several seeds, plus the CE-only baseline (from
the demo's token-data cache), all with the demo's training settings; and writes
OUT/fidelity.md and OUT/fidelity.json: held-out CE (mean ± sd over seeds), the paired
same-seed difference to the exact cache, bytes/token and distinct ids per position.

Usage (after `make demo`, which trains the teachers):
    python3 benches/fidelity.py [--demo-out demo-out] [--out fidelity-out] [--seeds 0,1,2]
        [--bin target/release/logitcache]
Finished runs are kept: rerunning continues.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STUDENT = """hidden_size = 48
num_hidden_layers = 2
num_attention_heads = 4
intermediate_size = 128
tie_word_embeddings = true
"""

# The demo's [train] section (pipelines/demo.toml) as `train` flags.
TRAIN = ["--steps", "150", "--batch-size", "16", "--lr", "3e-3", "--min-lr", "3e-4",
         "--warmup", "15", "--eval-every", "30", "--eval-batches", "10",
         "--eval-fraction", "0.05", "--log-every", "3", "--progress", "off"]


def caches(vocab):
    return {
        "exact": ["--top-k", str(vocab)],
        "topk-8": ["--top-k", "8"],
        "topk-64": ["--top-k", "64"],
        "sample-16": ["--mode", "sample", "--samples", "16"],
        "sample-50": ["--mode", "sample", "--samples", "50"],
        "hybrid-8+42": ["--mode", "hybrid", "--top-k", "8", "--samples", "42"],
        "topk-64-q8": ["--top-k", "64", "--logprob-dtype", "q8"],
        "hybrid-8+42-q8": ["--mode", "hybrid", "--top-k", "8", "--samples", "42",
                           "--logprob-dtype", "q8"],
        "sample-50-tau1.5": ["--mode", "sample", "--samples", "50",
                             "--proposal-temperature", "1.5"],
        "hybrid-8+42-tau1.5": ["--mode", "hybrid", "--top-k", "8", "--samples", "42",
                               "--proposal-temperature", "1.5"],
        # The same hybrid drawn with other cache seeds: how much the draws themselves move
        # the result (the training seeds are the same).
        "hybrid-8+42-seed1": ["--mode", "hybrid", "--top-k", "8", "--samples", "42",
                              "--cache-seed", "1"],
        "hybrid-8+42-seed2": ["--mode", "hybrid", "--top-k", "8", "--samples", "42",
                              "--cache-seed", "2"],
    }


def run(cmd, log):
    t = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\nsee {log}")
    return time.time() - t


def final_eval(run_dir):
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return None
    lines = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    evals = [l for l in lines if l.get("eval_loss") is not None and l.get("step") == 150]
    return evals[-1]["eval_loss"] if evals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-out", default=str(ROOT / "demo-out"))
    ap.add_argument("--out", default=str(ROOT / "fidelity-out"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bin", default=str(ROOT / "target/release/logitcache"))
    ap.add_argument("--teacher", default="t-144")
    ap.add_argument("--caches", default=None,
                    help="comma-separated subset of the caches (default: all); `exact` is always built")
    ap.add_argument("--kd-only", action="store_true", help="skip the KD + CE runs")
    ap.add_argument("--no-ce", action="store_true", help="skip the CE-only baseline")
    a = ap.parse_args()
    demo, out = Path(a.demo_out), Path(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    teacher = demo / "teachers" / a.teacher / "model.onnx"
    tok = demo / "tokenizer" / "tokenizer.json"
    data = demo / "data"
    for p in [teacher, tok, data / "manifest.json"]:
        if not p.exists():
            sys.exit(f"{p} is missing: run `make demo` first (or pass --demo-out)")
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    student = out / "s-48.toml"
    student.write_text(STUDENT)
    ort = os.environ.get("ORT_DYLIB_PATH", str(ROOT / ".ort/libonnxruntime.so.1.32.0"))
    corpus = ROOT / "pipelines/demo/fortunes.jsonl"
    info = {}
    chosen = caches(vocab)
    if a.caches:
        names = ["exact"] + [c for c in a.caches.split(",") if c != "exact"]
        unknown = [c for c in names if c not in chosen]
        if unknown:
            sys.exit(f"unknown cache(s) {unknown}; choose from {list(chosen)}")
        chosen = {c: chosen[c] for c in names}
    for name, extra in chosen.items():
        cdir = out / "caches" / name
        if not (cdir / "manifest.json").is_file() or not json.loads(
                (cdir / "manifest.json").read_text())["totals"]["complete"]:
            s = run([a.bin, "teacher", "--model", teacher, "--tokenizer", tok, "--corpus", corpus,
                     "--out", cdir, "--seq-len", "128", "--batch-size", "16", "--shard-size", "512",
                     "--threads", "2", "--progress", "off", "--ort-lib", ort, *extra],
                    out / "logs" / f"teacher-{name}.log")
            print(f"cache {name}: {s:.0f} s", flush=True)
        ins = json.loads(subprocess.run([a.bin, "inspect", cdir, "--json"], check=True,
                                        capture_output=True).stdout)
        info[name] = {"bytes_per_token": ins["bytes_per_token"],
                      "mean_distinct_ids": ins["mean_distinct_ids"], "args": extra}
    results = {}
    jobs = [(c, w, s) for c in chosen for w in ((0,) if a.kd_only else (0, 1)) for s in seeds]
    if not a.no_ce:
        jobs += [("ce", None, s) for s in seeds]
    for cache, ce_w, seed in jobs:
        key = cache if ce_w is None else f"{cache} {'KD+CE' if ce_w else 'KD'}"
        tag = f"{cache}-{'ce' if ce_w is None else ('kdce' if ce_w else 'kd')}-s{seed}"
        rdir = out / "runs" / tag
        loss = final_eval(rdir / "s-48")
        if loss is None:
            if rdir.exists():
                subprocess.run(["rm", "-rf", str(rdir)], check=True)
            cdir = data if ce_w is None else out / "caches" / cache
            flags = ["--loss", "ce"] if ce_w is None else ["--loss", "fkl", "--kd-weight", "1",
                                                            "--ce-weight", str(ce_w)]
            s = run([a.bin, "train", "--cache", cdir, "--tokenizer", tok, "--student", student,
                     "--out", rdir, "--seed", str(seed), "--threads", "2", *TRAIN, *flags],
                    out / "logs" / f"train-{tag}.log")
            loss = final_eval(rdir / "s-48")
            print(f"{tag}: eval_loss {loss:.4f} ({s:.0f} s)", flush=True)
        results.setdefault(key, {})[seed] = loss
    exact = results["exact KD"]
    rows = []
    for key, by_seed in results.items():
        vals = [by_seed[s] for s in seeds]
        diffs = [by_seed[s] - exact[s] for s in seeds]
        cache = key.split(" ")[0]
        rows.append({
            "run": key, "eval_loss": vals,
            "mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "paired_diff_to_exact_kd": diffs,
            "paired_diff_mean": statistics.mean(diffs),
            "paired_diff_sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "gap_to_exact_pct": 100 * statistics.mean(diffs) / statistics.mean(exact[s] for s in seeds),
            "bytes_per_token": info.get(cache, {}).get("bytes_per_token"),
            "mean_distinct_ids": info.get(cache, {}).get("mean_distinct_ids"),
        })
    (out / "fidelity.json").write_text(json.dumps({"seeds": seeds, "rows": rows, "caches": info},
                                                  indent=1))
    md = [f"Held-out CE (nats) of s-48 distilled from {a.teacher} (V = {vocab}), {len(seeds)} seeds "
          f"({', '.join(map(str, seeds))}); paired = same-seed difference to the exact cache with KD.",
          "", "| run | eval CE mean ± sd | paired Δ to exact KD (mean ± sd) | gap % | B/token | distinct ids |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bytes_per_token"]
        d = r["mean_distinct_ids"]
        md.append(f"| {r['run']} | {r['mean']:.4f} ± {r['sd']:.4f} | {r['paired_diff_mean']:+.4f} ± "
                  f"{r['paired_diff_sd']:.4f} | {r['gap_to_exact_pct']:+.2f} | "
                  f"{'' if b is None else f'{b:.1f}'} | {'' if not d else f'{d:.1f}'} |")
    (out / "fidelity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

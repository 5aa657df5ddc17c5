#!/usr/bin/env python3
"""Distil a Hugging Face ``LlamaForCausalLM`` student from a logitcache cache with PyTorch DDP
or FSDP.

    torchrun --nproc_per_node 2 examples/distill_torch.py --cache C --student S.json --out O --steps N

One process per rank (gloo on CPU, NCCL when CUDA is present; plain ``python`` runs one
process). The ranks replicate the student (DDP), or with ``--fsdp`` shard its parameters,
gradients and optimizer state (FSDP2: ``fully_shard`` per decoder layer and the rest at the
root), for students whose weights, gradients and optimizer state do not fit one device (only
rank 0 holds the whole student at start-up, in CPU memory); the two train the same weights up
to float rounding. Each rank reads its own part of the cache's training stream (``logitcache.Stream``
with the run's seed: the ranks' windows are disjoint and together cover the split), the loss
is ``logitcache.torch.kd_loss`` (the mathematics of ``logitcache train``), the optimiser
AdamW with ``logitcache train``'s defaults and schedule (linear warmup, cosine to
``--min-lr``, global-norm clipping).

Writes into ``--out``:

- ``metrics.jsonl``: the keys of ``logitcache train`` (``step``, ``loss``, ``kd``, ``ce``,
  ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``; eval lines ``eval_loss``, ``eval_ppl``,
  ``eval_kl``, ``eval_top1``, ``eval_tokens``), averaged over the ranks;
- ``checkpoint/``: the student by ``save_pretrained`` (``config.json``, ``model.safetensors``;
  ``from_pretrained`` loads it and ``logitcache export-onnx --checkpoint O/checkpoint`` makes it
  a teacher), the cache's ``tokenizer.json``, the optimizer state (``optimizer.pt``; under
  ``--fsdp`` ``optimizer/``, each rank's shards saved by that rank) and ``trainer_state.json``
  (step, tokens, every rank's stream position), and last ``sha256.json`` (the sha256 and size
  of each other file). A save goes to ``checkpoint.tmp`` and is swapped in by renames, so a
  kill never leaves a half-written checkpoint behind.
- ``--resume`` continues exactly where the checkpoint stopped (same weights as a run that was
  never interrupted) and starts fresh, saying so, when there is no checkpoint yet; it refuses
  a checkpoint of another cache, student, world size or stream, and one whose files do not
  match its ``sha256.json`` (naming the file).
- ``--log-windows`` also writes ``windows/rank-R.jsonl``: the windows (``seq_ids``) of each
  step on rank R.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

import logitcache
from logitcache.torch import LOSSES, kd_loss, to_torch

# `logitcache train`'s presets: (hidden, layers, heads, kv heads, intermediate).
PRESETS = {
    "nano": (64, 2, 4, 2, 176),
    "micro": (128, 4, 4, 2, 344),
    "mini": (256, 4, 8, 4, 688),
    "small": (384, 6, 6, 2, 1024),
    "base": (512, 8, 8, 4, 1376),
}
# The keys a student file may set (those of `logitcache train`'s student TOML).
STUDENT_KEYS = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
    "tie_word_embeddings",
}


class UsageError(Exception):
    """A bad argument or input: printed without a traceback, exit status 2."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Distil a Hugging Face LlamaForCausalLM student from a logitcache cache (DDP with torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cache", required=True, help="the cache directory (logitcache teacher --out)")
    p.add_argument("--student", required=True, help="a preset (" + ", ".join(PRESETS) + ") or a JSON file of LlamaConfig keys: " + ", ".join(sorted(STUDENT_KEYS)))
    p.add_argument("--out", required=True, help="the run directory (metrics.jsonl, checkpoint/)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine schedule (default lr / 10)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0 = none)")
    p.add_argument("--loss", choices=LOSSES, default="fkl", help="the distillation loss (as logitcache train)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KD term (times T^2)")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of next-token cross-entropy")
    p.add_argument("--temperature", type=float, default=None, help="KD temperature (default and only allowed value: the cache's)")
    p.add_argument("--jsd-beta", type=float, default=0.5, help="beta of the generalised JSD")
    p.add_argument("--loss-chunk", type=int, default=1024, help="positions per loss chunk (0 = all at once)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    p.add_argument("--eval-fraction", type=float, default=0.02, help="fraction of windows held out (by seq_id hash)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = only at the end)")
    p.add_argument("--eval-batches", type=int, default=50, help="batches per evaluation")
    p.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps (0 = only at the end)")
    p.add_argument("--log-every", type=int, default=10, help="write a metrics line every N steps")
    p.add_argument("--stop-after", type=int, default=None, help="stop (saving a checkpoint) after this step, as if preempted")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (starts fresh when there is none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="cuda when available under auto")
    p.add_argument("--log-windows", action="store_true", help="write windows/rank-R.jsonl: each step's seq_ids")
    p.add_argument("--fsdp", action="store_true", help="shard the student's parameters, gradients and optimizer state over the ranks (FSDP2, one unit per decoder layer) instead of replicating them (DDP); needs torchrun and torch >= 2.6. Only rank 0 builds the student whole, in CPU memory; every rank builds it on the meta device and receives its shard from rank 0. The weights are saved as a DDP run saves them (gathered to rank 0); the optimizer state is saved sharded into checkpoint/optimizer/, each rank writing, hashing and on --resume reading back its own shards (and the few small entries replicated over the ranks), so no rank holds the whole optimizer state (--out must be on a filesystem every rank sees: a save checks it); checkpoints with optimizer.pt (of earlier versions) resume too; a run resumes only as it started")
    a = p.parse_args(argv)
    checks = [
        ("--steps", a.steps >= 1, "at least 1"),
        ("--batch-size", a.batch_size >= 1, "at least 1"),
        ("--grad-accum", a.grad_accum >= 1, "at least 1"),
        ("--lr", a.lr > 0 and math.isfinite(a.lr), "a finite number > 0"),
        ("--warmup", a.warmup >= 0, ">= 0"),
        ("--weight-decay", a.weight_decay >= 0 and math.isfinite(a.weight_decay), "a finite number >= 0"),
        ("--grad-clip", a.grad_clip >= 0 and math.isfinite(a.grad_clip), "a finite number >= 0"),
        ("--kd-weight", a.kd_weight >= 0 and math.isfinite(a.kd_weight), "a finite number >= 0"),
        ("--ce-weight", a.ce_weight >= 0 and math.isfinite(a.ce_weight), "a finite number >= 0"),
        ("--jsd-beta", 0 < a.jsd_beta < 1, "in (0, 1)"),
        ("--loss-chunk", a.loss_chunk >= 0, ">= 0"),
        ("--seed", a.seed >= 0, ">= 0"),
        ("--eval-fraction", 0 <= a.eval_fraction < 1, "in [0, 1)"),
        ("--eval-every", a.eval_every >= 0, ">= 0"),
        ("--eval-batches", a.eval_batches >= 1, "at least 1"),
        ("--save-every", a.save_every >= 0, ">= 0"),
        ("--log-every", a.log_every >= 1, "at least 1"),
    ]
    if a.stop_after is not None:
        checks.append(("--stop-after", a.stop_after >= 1, "at least 1"))
    if a.threads is not None:
        checks.append(("--threads", a.threads >= 1, "at least 1"))
    for flag, ok, want in checks:
        if not ok:
            p.error(f"{flag} must be {want}")
    if a.min_lr is None:
        a.min_lr = a.lr / 10.0
    if not (0 <= a.min_lr <= a.lr):
        p.error(f"--min-lr must be in [0, --lr] (got {a.min_lr} with --lr {a.lr}): the cosine schedule decays from --lr down to it")
    if a.kd_weight == 0 and a.ce_weight == 0 and a.loss != "ce":
        p.error("--kd-weight and --ce-weight are both 0: nothing to train")
    return a


def lr_at(a: argparse.Namespace, step: int) -> float:
    """`logitcache train`'s schedule: linear warmup, then cosine to --min-lr (0-based step)."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    span = max(a.steps - min(a.warmup, a.steps), 1)
    t = min((step - a.warmup) / span, 1.0)
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1.0 + math.cos(math.pi * t))


def student_config(spec: str, vocab: int) -> Dict[str, Any]:
    if spec in PRESETS:
        h, n, heads, kv, inter = PRESETS[spec]
        f = dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter)
    else:
        if not os.path.isfile(spec):
            raise UsageError(f"--student {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        try:
            with open(spec) as fh:
                f = json.load(fh)
        except (OSError, ValueError) as e:
            raise UsageError(f"--student {spec}: not a JSON object of LlamaConfig keys ({e})") from None
        if not isinstance(f, dict):
            raise UsageError(f"--student {spec}: not a JSON object of LlamaConfig keys")
        unknown = sorted(set(f) - STUDENT_KEYS)
        if unknown:
            raise UsageError(f"--student {spec}: unknown keys {unknown}; the student is a Llama with these keys: {sorted(STUDENT_KEYS)}")
    c = dict(
        num_key_value_heads=f.get("num_attention_heads"),
        vocab_size=vocab,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    c.update({k: v for k, v in f.items() if v is not None})
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings"):
        if not isinstance(c.get(k), int) or isinstance(c.get(k), bool) or c[k] < 1:
            raise UsageError(f"--student {spec}: {k} must be an integer >= 1, not {c.get(k)!r}")
    if c["hidden_size"] % c["num_attention_heads"] or c["num_attention_heads"] % c["num_key_value_heads"]:
        raise UsageError(f"--student {spec}: hidden_size must divide by num_attention_heads and num_attention_heads by num_key_value_heads")
    if c["vocab_size"] < vocab:
        raise UsageError(f"--student {spec}: vocab_size {c['vocab_size']} is below the cache's {vocab}; the student's vocabulary must cover the teacher's")
    return c


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class Run:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.distributed = under_torchrun()
        cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
        if a.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
        if self.distributed:
            dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if a.threads is not None:
            torch.set_num_threads(a.threads)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def all_mean(self, values: List[float]) -> List[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0])

    def gather(self, obj: Any) -> List[Any]:
        if self.world == 1:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, error: Optional[str]) -> None:
        """Raises on every rank when any rank has an error (so no rank waits forever)."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise UsageError(errors[0])


# In every checkpoint, written last: the sha256 and size of each other file (the schema of
# `logitcache train`'s checkpoint/checksums.json, under a name of its own, so that
# `logitcache export-onnx` still takes the directory as a Hugging Face checkpoint).
CHECKSUMS = "sha256.json"
# Under --fsdp the optimizer state is saved sharded, each rank writing its own part, into this
# directory (torch.distributed.checkpoint's format); a DDP run's is one file, OPTIMIZER_FILE.
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_FILE = "optimizer.pt"
# The files a checkpoint cannot do without (`tokenizer.json` is there when the cache names one),
# besides its weights and optimizer state (`required_files`).
CHECKPOINT_FILES = ("config.json", "trainer_state.json")
# What a save or load may raise: torch.distributed.checkpoint's failures (raised on every rank
# alike, each rank's gathered) are a BaseException, not an Exception.
SAVE_ERRORS = (Exception, CheckpointException)


def is_shard(name: str) -> bool:
    """Whether checkpoint file ``name`` belongs to the sharded optimizer state."""
    return name.startswith(OPTIMIZER_DIR + "/")


def required_files(names) -> List[str]:
    """The files a checkpoint holding ``names`` (paths relative to it) needs: CHECKPOINT_FILES,
    its weights (``model.safetensors`` or, for a student saved in parts, the index of its
    shards) and its optimizer state (``optimizer.pt``, or the sharded state's metadata)."""
    index = "model.safetensors.index.json"
    return [
        *CHECKPOINT_FILES,
        index if index in names else "model.safetensors",
        f"{OPTIMIZER_DIR}/.metadata" if any(map(is_shard, names)) else OPTIMIZER_FILE,
    ]


def owner(name: str, world: int) -> int:
    """The rank that hashes checkpoint file ``name`` on save and on --resume: a sharded
    optimizer file goes to the rank that wrote it (``optimizer/__R_0.distcp``, which that rank
    also reads back), everything else to rank 0 (which writes and reads it)."""
    m = re.fullmatch(OPTIMIZER_DIR + r"/__(\d+)_\d+\.distcp", name)
    return int(m.group(1)) % world if m else 0


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(d: str) -> List[str]:
    """Every file of checkpoint directory ``d`` but CHECKSUMS, as paths relative to it (the
    sharded optimizer state's as ``optimizer/NAME``), sorted."""
    names = [n for n in os.listdir(d) if n != CHECKSUMS and os.path.isfile(os.path.join(d, n))]
    sub = os.path.join(d, OPTIMIZER_DIR)
    if os.path.isdir(sub):
        names += [f"{OPTIMIZER_DIR}/{n}" for n in os.listdir(sub) if os.path.isfile(os.path.join(sub, n))]
    return sorted(names)


def file_sums(d: str, names: List[str]) -> Dict[str, Dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for each of ``names`` (relative to directory ``d``)."""
    return {n: {"sha256": sha256_file(os.path.join(d, n)), "bytes": os.path.getsize(os.path.join(d, n))} for n in names}


def verify_checkpoint(d: str, warn, rank: int = 0, world: int = 1) -> Optional[str]:
    """What is wrong with checkpoint ``d`` (a missing, truncated, changed or unreadable file,
    against its sha256.json), or None. Every rank checks that each file is there with its
    size; rank ``rank`` of ``world`` hashes the files it ``owner``s, so under --fsdp each rank
    reads its own part of the optimizer state and no rank all of it. A checkpoint written
    before checksums were kept is accepted when its files are there, with a warning through
    ``warn``."""
    def damaged(what: str) -> str:
        return f"checkpoint {d} is damaged: {what}; it cannot be trusted: resume from a copy made before the damage, or delete it and train again"

    try:
        with open(os.path.join(d, CHECKSUMS)) as fh:
            files = json.load(fh)["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        present = set(checkpoint_files(d))
        if any(map(is_shard, present)):
            # Sharded optimizer state has always been saved with sha256.json: without it the
            # shards cannot be told complete.
            return damaged(f"{CHECKSUMS} is missing (every checkpoint with a sharded {OPTIMIZER_DIR}/ has one)")
        absent = [n for n in required_files(present) if n not in present]
        if absent:
            return damaged(f"{', '.join(absent)} and {CHECKSUMS} are missing")
        warn(f"warning: checkpoint {d} has no {CHECKSUMS} (written before checkpoints kept checksums): its files are not verified")
        return None
    except (ValueError, KeyError, TypeError) as e:
        return damaged(f"{CHECKSUMS} does not parse ({type(e).__name__}: {e})")
    except OSError as e:
        return damaged(f"cannot read {CHECKSUMS} ({e})")
    if OPTIMIZER_FILE in files and os.path.exists(os.path.join(d, OPTIMIZER_DIR)):
        # Which of the two is loaded must be the one verified.
        return damaged(f"it holds both {OPTIMIZER_FILE} and {OPTIMIZER_DIR}/, and {CHECKSUMS} lists {OPTIMIZER_FILE}")
    for name in sorted(set(required_files(files)) | set(files)):
        want = files.get(name)
        path = os.path.join(d, name)
        if not isinstance(want, dict) or not {"sha256", "bytes"} <= set(want):
            return damaged(f"{CHECKSUMS} does not list {name}")
        if not os.path.isfile(path):
            return damaged(f"{name} is missing")
        try:
            size = os.path.getsize(path)
            if size != want["bytes"]:
                return damaged(f"{name} has {size} bytes, {CHECKSUMS} records {want['bytes']}")
            if owner(name, world) != rank:
                continue
            sha = sha256_file(path)
        except OSError as e:
            return damaged(f"cannot read {name} ({e})")
        if sha != want["sha256"]:
            return damaged(f"{name} has sha256 {sha}, {CHECKSUMS} records {want['sha256']}")
    return None


def lock_run_dir(out: str):
    """An advisory lock on OUT (like `logitcache train`'s): a second run on it is refused."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".lock")
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        raise UsageError(f"{out} is in use by another training run ({holder}); wait for it or use another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return fh


def save_optimizer_shards(model: torch.nn.Module, opt: torch.optim.Optimizer, d: str) -> None:
    """Under FSDP: save ``opt``'s state sharded into ``d/optimizer`` (every rank takes part;
    ``torch.distributed.checkpoint``: each rank writes its own shards, rank 0 the metadata),
    so no rank gathers the whole state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=os.path.join(d, OPTIMIZER_DIR))


def optimizer_shard_sums(d: str, rank: int, world: int) -> Dict[str, Dict[str, Any]]:
    """The sha256 and size of the files of ``d/optimizer`` that rank ``rank`` ``owner``s
    (paths relative to ``d``), for sha256.json."""
    return file_sums(d, [n for n in checkpoint_files(d) if is_shard(n) and owner(n, world) == rank])


def load_optimizer_shards(model: torch.nn.Module, opt: torch.optim.Optimizer, d: str) -> None:
    """Under FSDP: load the state ``save_optimizer_shards`` wrote into ``d/optimizer``: each
    rank reads its own shards (into the optimizer's state, allocated at its shard's size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, opt)}
    try:
        dcp.load(state, checkpoint_id=os.path.join(d, OPTIMIZER_DIR))
        set_optimizer_state_dict(model, opt, state["optimizer"])
    except SAVE_ERRORS as e:
        raise UsageError(f"cannot load the optimizer state of checkpoint {d}: {type(e).__name__}: {e}") from None


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str, fsdp: bool, device: torch.device, mmap: bool = True) -> None:
    """Load ``optimizer.pt`` (the whole, unsharded AdamW state: a DDP run's, or an FSDP run's
    saved before its state was saved sharded) into ``opt``.

    Under FSDP each rank keeps only its shard: every rank memory-maps the file (``mmap``),
    rank 0 reads each moment through the mapping and sends each rank its slice, so a rank's
    own memory grows with its shard (up to about twice it, while the optimizer's zeroed state
    and the loaded one coexist), not with the whole state, which stays in the page cache
    (``benches/fsdp_resume_memory.py`` measures both ways; ``mmap=False`` reads the file whole
    into every rank, for that comparison). Under DDP every rank needs all of it, read onto
    its device.
    """
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        set_optimizer_state_dict(model, opt, saved, options=StateDictOptions(full_state_dict=True))
        # The moments arrive as copies, but the scalars (each parameter's `step`) would stay
        # views into the mapped file, keeping it mapped (and, once a later save removes it,
        # its disk space held) for the whole run.
        for st in opt.state.values():
            for key, v in st.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    st[key] = v.clone()
    else:
        opt.load_state_dict(torch.load(path, map_location=device, weights_only=True))


def evaluate(model: torch.nn.Module, r: Run, temperature: float) -> Dict[str, float]:
    """`logitcache train`'s evaluation: the held-out split, in order, on rank 0 (under --fsdp on
    every rank, as a sharded forward needs them all; each computes the same values)."""
    a = r.a
    stream = logitcache.Stream(a.cache, a.batch_size, split="eval", eval_fraction=a.eval_fraction, shuffle=False, epochs=1)
    ce = kl = top1 = n_ce = n_kd = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, b in enumerate(stream):
            if i >= a.eval_batches:
                break
            t = to_torch(b, r.device)
            logits = model(input_ids=t["input_ids"], attention_mask=t["mask"].long()).logits.float()
            _, parts = kd_loss(logits, t, loss="fkl", temperature=temperature, kd_weight=1.0, ce_weight=1.0, chunk=a.loss_chunk or None)
            m, tm = float(t["mask"].sum()), float(t["target_mask"].sum())
            kl += float(parts["kd"]) * m
            ce += float(parts["ce"]) * tm
            n_kd += m
            n_ce += tm
            hit = (logits.argmax(-1) == t["topk_ids"][..., 0]).float() * t["mask"]
            top1 += float(hit.sum())
    model.train(was_training)
    loss = ce / max(n_ce, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(loss), "eval_kl": kl / max(n_kd, 1.0), "eval_top1": top1 / max(n_kd, 1.0), "eval_tokens": int(n_kd)}


def write_line(fh, line: Dict[str, Any]) -> None:
    fh.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in sorted(line.items())}) + "\n")
    fh.flush()


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    r = Run(a)
    try:
        return train(a, r)
    except (UsageError, logitcache.CacheError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if r.distributed and dist.is_initialized():
            dist.destroy_process_group()


def train(a: argparse.Namespace, r: Run) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    lock = None
    error = None
    if a.fsdp and not r.distributed:
        raise UsageError("--fsdp shards the student over torchrun's processes: run it under torchrun (torchrun --nproc_per_node N examples/distill_torch.py ...), or leave --fsdp out")
    try:
        if r.rank == 0:
            lock = lock_run_dir(a.out)
        cache = logitcache.Cache(a.cache)
        if not cache.complete:
            raise UsageError(f"{a.cache} is incomplete (its teacher run has not finished); finish it with the same `logitcache teacher … --resume`")
    except (UsageError, logitcache.CacheError, OSError) as e:
        error = str(e)
    r.agree(error)
    temperature = cache.temperature if a.temperature is None else a.temperature
    if abs(temperature - cache.temperature) > 1e-6:
        raise UsageError(f"--temperature {temperature} differs from the cache's {cache.temperature} (its log-probs are at that temperature); pass --temperature {cache.temperature} or build a cache at {temperature}")
    cfg = student_config(a.student, cache.vocab_size)
    if cfg["max_position_embeddings"] < cache.seq_len:
        raise UsageError(f"--student {a.student}: max_position_embeddings {cfg['max_position_embeddings']} is below the cache's seq_len {cache.seq_len}")

    # A held-out split with no window (a small cache): train on every window, no evaluation.
    # --eval-fraction 0: no held-out split, every window trains.
    split, eval_fraction = ("train", a.eval_fraction) if a.eval_fraction > 0 else ("all", 0.0)
    if eval_fraction > 0:
        try:
            next(logitcache.Stream(a.cache, 1, split="eval", eval_fraction=eval_fraction, shuffle=False, epochs=1))
        except (StopIteration, logitcache.CacheError):
            r.log(f"warning: --eval-fraction {eval_fraction} holds out no window of this cache ({cache.sequences} windows): training on every window without evaluation")
            split, eval_fraction = "all", 0.0
    a.eval_fraction = eval_fraction

    torch.manual_seed(a.seed)
    hf = LlamaConfig(
        hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"], rope_theta=cfg["rope_theta"],
        rms_norm_eps=cfg["rms_norm_eps"], tie_word_embeddings=cfg["tie_word_embeddings"],
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    if a.fsdp:
        # Under FSDP every rank builds the student on the meta device (no memory), shards it
        # and receives its shard from rank 0, which alone builds it whole, on the CPU (below).
        with torch.device("meta"):
            model = LlamaForCausalLM(hf)
    else:
        model = LlamaForCausalLM(hf).to(r.device)
    stream = logitcache.Stream(a.cache, a.batch_size, split=split, eval_fraction=eval_fraction, seed=a.seed, rank=r.rank, world_size=r.world, shuffle=True, epochs=None)
    sharding = "fsdp" if a.fsdp else "ddp"
    identity = {"cache_manifest": cache.manifest.get("checksum"), "student": cfg, "world_size": r.world, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "seed": a.seed, "steps": a.steps, "sharding": sharding}
    # Checkpoints written before --fsdp existed are DDP ones.
    recorded_default = {"sharding": "ddp"}

    ckpt = os.path.join(a.out, "checkpoint")
    if a.resume and not os.path.isdir(ckpt) and os.path.isdir(ckpt + ".old"):
        ckpt = ckpt + ".old"  # a save was cut off between its two renames
    step, tokens, seconds = 0, 0, 0.0
    metrics_path = os.path.join(a.out, "metrics.jsonl")
    state = None
    if a.resume and os.path.isdir(ckpt):
        # Every file is checked against sha256.json (a checkpoint directory exists only once
        # a save finished, so a file missing from it is damage, not a fresh start), each
        # rank hashing its own part; every rank hears what any found.
        r.agree(verify_checkpoint(ckpt, r.log, r.rank, r.world))
        with open(os.path.join(ckpt, "trainer_state.json")) as fh:
            state = json.load(fh)
        recorded = {k: state["identity"].get(k, recorded_default.get(k)) for k in identity}
        diff = [k for k in identity if recorded[k] != identity[k]]
        if diff:
            raise UsageError(
                f"{ckpt} is of another run ("
                + "; ".join(f"{k}: {recorded[k]!r} there, {identity[k]!r} here" for k in diff)
                + f"); resume with the same cache, student, --steps, --batch-size, --grad-accum, --seed, process count and --fsdp, or use another --out"
            )
        if not a.fsdp:
            model.load_state_dict(LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict())
    whole = None
    if a.fsdp:
        # Rank 0 builds the whole student on the CPU: the checkpoint's weights, or the seed's
        # initial ones (DDP's, which also come from rank 0). The others wait to hear whether
        # it could.
        error = None
        if r.rank == 0:
            try:
                if state is not None:
                    whole = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
                else:
                    torch.manual_seed(a.seed)
                    whole = LlamaForCausalLM(hf)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, not wait
                what = f"cannot read the checkpoint {ckpt}" if state is not None else "rank 0 cannot build the whole student in CPU memory"
                error = f"{what}: {type(e).__name__}: {e}"
        r.agree(error)
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise UsageError(f"--fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}") from None
        # The ranks' own device type (a CPU run on a machine with a GPU stays on the CPU).
        mesh = init_device_mesh(r.device.type, (r.world,))
        # One unit per decoder layer (its parameters are gathered only while it runs), the
        # embeddings, final norm and head at the root.
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Each rank allocates its shards only; rank 0 broadcasts the whole weights tensor by
        # tensor and each rank keeps its shard of each (a device holds at most one whole
        # tensor at a time).
        model.to_empty(device=r.device)
        set_model_state_dict(model, whole.state_dict() if r.rank == 0 else {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # The buffers (the rotary frequencies) are in no state dict: rank 0's, to every rank.
        with torch.no_grad():
            if r.rank == 0:
                built = dict(whole.named_buffers())
                for name, b in model.named_buffers():
                    b.copy_(built[name])
            for b in model.buffers():
                dist.broadcast(b, src=0)
        del whole
        r.log(f"FSDP: the student's {len(model.model.layers)} decoder layers and its root sharded over {r.world} ranks; rank 0 built it whole on the CPU, the other ranks only their shards")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)
    if state is not None:
        if a.fsdp and os.path.isfile(os.path.join(ckpt, OPTIMIZER_DIR, ".metadata")):
            load_optimizer_shards(model, opt, ckpt)
        else:
            load_optimizer_state(model, opt, os.path.join(ckpt, OPTIMIZER_FILE), a.fsdp, r.device)
        stream.load_state_dict(state["streams"][r.rank])
        step, tokens, seconds = state["step"], state["tokens"], state["seconds"]
        r.log(f"resuming {a.out} at step {step}")
    elif a.resume:
        r.log(f"--resume: {a.out} has no checkpoint yet; starting fresh")
    if r.rank == 0:
        # metrics.jsonl keeps the lines up to the checkpoint's step (a killed run's later lines go).
        kept = []
        if step > 0 and os.path.isfile(metrics_path):
            with open(metrics_path) as fh:
                kept = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= step]
        metrics_tmp = metrics_path + ".tmp"
        with open(metrics_tmp, "w") as fh:
            fh.writelines(kept)
        os.replace(metrics_tmp, metrics_path)
        metrics = open(metrics_path, "a")
    windows = None
    if a.log_windows:
        os.makedirs(os.path.join(a.out, "windows"), exist_ok=True)
        wpath = os.path.join(a.out, "windows", f"rank-{r.rank}.jsonl")
        kept = []
        if step > 0 and os.path.isfile(wpath):
            with open(wpath) as fh:
                kept = [ln for ln in fh if ln.strip() and json.loads(ln)["step"] <= step]
        windows = open(wpath, "w", buffering=1)  # line by line: nothing waits for a close
        windows.writelines(kept)

    ddp = torch.nn.parallel.DistributedDataParallel(model) if r.world > 1 and not a.fsdp else model
    model.train()

    final = os.path.join(a.out, "checkpoint")
    tmp = final + ".tmp"

    def save() -> None:
        def failed(e: Exception) -> str:
            return f"cannot save the checkpoint into {final}: {type(e).__name__}: {e}"

        started = time.time()
        opt_sums: Dict[str, Dict[str, Any]] = {}
        shard_hashing = 0.0  # the longest any rank spent hashing its part of the optimizer state
        # Rank 0 clears checkpoint.tmp (a killed save's) for every rank to write into.
        error = None
        if r.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(os.path.join(tmp, OPTIMIZER_DIR) if a.fsdp else tmp)
            except OSError as e:
                error = failed(e)
        r.agree(error)
        if a.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # The weights gathered whole on rank 0 (every rank takes part), so they are the
            # files a DDP run writes: `from_pretrained` and `export-onnx` read them as they are.
            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            opt_state = None
            # The optimizer state (twice the weights) is not gathered: each rank writes and
            # hashes its own shards.
            mine, seconds = {}, 0.0
            try:
                save_optimizer_shards(model, opt, tmp)
                t = time.time()
                mine = optimizer_shard_sums(tmp, r.rank, r.world)
                seconds = time.time() - t
            except SAVE_ERRORS as e:  # every rank must hear of it, not wait
                error = failed(e)
            r.agree(error)
            for part, part_seconds in r.gather((mine, seconds)):
                opt_sums.update(part)
                shard_hashing = max(shard_hashing, part_seconds)
        else:
            weights, opt_state = None, opt.state_dict()
        streams = r.gather(stream.state_dict())
        error = None
        if r.rank == 0:
            try:
                hashing = write(weights, opt_state, opt_sums, streams)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, not wait
                error = failed(e)
        # Every rank learns whether rank 0's write failed (instead of waiting at a barrier).
        r.agree(error)
        if r.rank == 0:
            sharded = f", each rank up to {shard_hashing:.1f} s on its optimizer shards" if a.fsdp else ""
            r.log(f"saved {final} at step {step} in {time.time() - started:.1f} s (hashing {hashing:.1f} s on rank 0{sharded})")

    def write(weights, opt_state, opt_sums, streams) -> float:
        """Rank 0's part of a save, into the emptied ``tmp``: everything but the sharded
        optimizer state (there already, its files hashed in ``opt_sums``), then sha256.json,
        then the renames. Returns the seconds spent hashing."""
        old = final + ".old"
        if weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            # A plain model holding the gathered weights, so config.json names
            # LlamaForCausalLM whatever a transformers version makes of FSDP's subclass.
            with torch.device("meta"):
                plain = LlamaForCausalLM(hf)
            plain.load_state_dict(weights, assign=True)
            plain.tie_weights()
            plain.save_pretrained(tmp, safe_serialization=True)
        if opt_state is not None:
            torch.save(opt_state, os.path.join(tmp, OPTIMIZER_FILE))
        tok = cache.manifest.get("tokenizer", {}).get("path")
        if tok and os.path.isfile(tok):
            shutil.copyfile(tok, os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
            json.dump({"step": step, "tokens": tokens, "seconds": seconds + time.time() - t0, "identity": identity, "streams": streams}, fh, indent=1, sort_keys=True)
        # Last: a checkpoint with its sha256.json is complete (and checked on --resume).
        for n, want in sorted(opt_sums.items()):
            path = os.path.join(tmp, n)
            if not os.path.isfile(path) or os.path.getsize(path) != want["bytes"]:
                raise UsageError(f"{path}, which a rank wrote, is missing or of another size here on rank 0: --out must be on a filesystem every rank sees (under --fsdp each rank writes its part of the checkpoint)")
        t = time.time()
        files = file_sums(tmp, [n for n in checkpoint_files(tmp) if n not in opt_sums])
        hashed = time.time() - t
        with open(os.path.join(tmp, CHECKSUMS), "w") as fh:
            json.dump({"files": {**files, **opt_sums}}, fh, indent=1, sort_keys=True)
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return hashed

    stop = min(a.stop_after or a.steps, a.steps)
    t0 = time.time()
    window_t, window_tokens = time.time(), 0.0
    while step < stop:
        total = kd = ce = 0.0
        step_tokens = 0.0
        for micro in range(a.grad_accum):
            b = next(stream)
            t = to_torch(b, r.device)
            if windows is not None:
                windows.write(json.dumps({"step": step + 1, "seq_ids": [int(s) for s in b["seq_ids"]]}) + "\n")
            sync = micro == a.grad_accum - 1 or r.world == 1
            if a.fsdp:
                # Gradients are reduce-scattered on the last micro-batch only (as DDP's no_sync).
                model.set_requires_gradient_sync(sync)
                ctx = _null()
            else:
                ctx = ddp.no_sync() if not sync else _null()
            with ctx:
                logits = ddp(input_ids=t["input_ids"], attention_mask=t["mask"].long()).logits.float()
                loss, parts = kd_loss(logits, t, loss=a.loss, temperature=temperature, kd_weight=a.kd_weight, ce_weight=a.ce_weight, jsd_beta=a.jsd_beta, chunk=a.loss_chunk or None)
                (loss / a.grad_accum).backward()
            total += float(loss.detach()) / a.grad_accum
            kd += float(parts["kd"].detach()) / a.grad_accum
            ce += float(parts["ce"].detach()) / a.grad_accum
            step_tokens += float(t["mask"].sum())
        total, kd, ce = r.all_mean([total, kd, ce])
        if not math.isfinite(total):
            raise UsageError(f"the loss became {total} at step {step}; lower --lr (now {a.lr}) or check the cache with `logitcache verify`")
        clip = a.grad_clip if a.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        # Under FSDP the norm is a DTensor over the ranks' shards.
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        lr = lr_at(a, step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        global_tokens = r.all_sum(step_tokens)
        tokens += int(global_tokens)
        window_tokens += global_tokens
        if r.rank == 0 and (step % a.log_every == 0 or step == a.steps):
            secs = max(time.time() - window_t, 1e-9)
            write_line(metrics, {"step": step, "loss": total, "kd": kd, "ce": ce, "lr": lr, "grad_norm": gnorm, "tokens": tokens, "tokens_per_s": window_tokens / secs})
            print(f"step {step}/{a.steps}  loss {total:.4f}  {window_tokens / secs:.0f} tok/s", file=sys.stderr, flush=True)
            window_t, window_tokens = time.time(), 0.0
        last = step == a.steps
        if eval_fraction > 0 and (last or (a.eval_every > 0 and step % a.eval_every == 0)):
            # A sharded student's forward needs every rank: each evaluates the same batches.
            if r.rank == 0 or a.fsdp:
                m = evaluate(model, r, temperature)
            if r.rank == 0:
                write_line(metrics, dict(m, step=step))
                print(f"step {step}: held-out loss {m['eval_loss']:.4f}, KL {m['eval_kl']:.4f}", file=sys.stderr, flush=True)
            if r.world > 1:
                dist.barrier()
        if last or step == stop or (a.save_every > 0 and step % a.save_every == 0):
            save()
    if windows is not None:
        windows.close()
    if r.rank == 0:
        metrics.close()
    if lock is not None:
        lock.close()
    return 0


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    if not under_torchrun():
        sys.exit(main())
    # Under torchrun each rank ends with os._exit, without the interpreter's teardown. Under DDP
    # the gloo process group's worker threads were seen alive after destroy_process_group, and
    # a worker that lets go of the last collective's tensors while the interpreter is finalizing
    # needs the GIL: Python ends that thread mid-unwind and the process aborts ("terminate called
    # without an active exception"), after a run that had finished and saved. Every file is
    # closed or flushed line by line by now; an uncaught exception still prints its traceback.
    try:
        code = main()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then the same exit as above
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

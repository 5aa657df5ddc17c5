#!/usr/bin/env python3
"""How much memory an FSDP rank takes to load a checkpoint's optimizer state on ``--resume``.

``examples/distill_torch.py`` saves the whole (unsharded) AdamW state in ``optimizer.pt``; its
``load_optimizer_state`` memory-maps the file under FSDP (rank 0 reads each moment through the
mapping and sends each rank its slice). This measures that against reading the file whole into
every rank (``mmap=False``): the rise of each rank's anonymous memory (``RssAnon``, sampled
every 2 ms, after ``malloc_trim`` hands freed heap back) while the state loads, on 2 gloo
ranks, for a stack of ``LAYERS`` square ``Linear(WIDTH)`` layers sharded as the example shards
a student (one ``fully_shard`` unit per layer and the root). Each way runs in its own
processes, so neither inherits the other's freed memory. Every rank also checks that what it
loaded equals the shard it had before the save, and that the file is no longer mapped once the
load returned (exits 1 if not).

    .venv/bin/python benches/fsdp_resume_memory.py [LAYERS] [WIDTH]   (default 8 2048: 33.6M
    parameters, a 256 MiB optimizer.pt)

Prints one JSON line per rank and way: ``way``, ``rank``, ``file_mib``, ``shard_mib`` (this
rank's part of the moments) and ``rise_mib``, ``equal``, ``still_mapped``.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


def anon_mib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def rank_main(way: str, path: str, layers: int, width: int) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("distill_torch", os.path.join(root, "examples", "distill_torch.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # as at a resume: no gradients
    if way == "save":
        # As the example's save: gathered whole to rank 0, on the CPU.
        whole = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(whole, path)
        dist.barrier()
        dist.destroy_process_group()
        return 0
    mine = {k: {m: v[m].to_local().clone() for m in ("exp_avg", "exp_avg_sq")} for k, v in get_optimizer_state_dict(model, opt)["state"].items()}
    shard_mib = sum(t.numel() * t.element_size() for v in mine.values() for t in v.values()) / 2**20
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dist.barrier()
    # Freed heap goes back to the system first, so the rise is new memory, not reused heap.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = anon_mib(), [0], [False]

    def poll() -> None:
        while not done[0]:
            peak[0] = max(peak[0], anon_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    try:
        example.load_optimizer_state(model, fresh, path, True, torch.device("cpu"), mmap=(way == "mmap"))
    finally:
        done[0] = True
        sampler.join()
    peak[0] = max(peak[0], anon_mib())
    gc.collect()
    with open("/proc/self/maps") as fh:
        mapped = any(path in line for line in fh)
    got = get_optimizer_state_dict(model, fresh)["state"]
    equal = all(torch.equal(got[k][m].to_local(), mine[k][m]) for k in mine for m in ("exp_avg", "exp_avg_sq"))
    print(json.dumps({"way": way, "rank": rank, "file_mib": round(os.path.getsize(path) / 2**20, 1), "shard_mib": round(shard_mib, 1), "rise_mib": peak[0] - base, "equal": equal, "still_mapped": mapped}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if equal and not mapped else 1


def main() -> int:
    if "LOCAL_RANK" in os.environ:
        return rank_main(*sys.argv[1:3], int(sys.argv[3]), int(sys.argv[4]))
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    width = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "optimizer.pt")
        for way in ("save", "mmap", "whole"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.abspath(__file__), way, path, str(layers), str(width)]
            done = subprocess.run(cmd, env=env)
            if done.returncode != 0:
                print(f"fsdp_resume_memory: the {way} run failed (exit {done.returncode})", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How much memory an FSDP rank takes to save a checkpoint's optimizer state, and to load it on
``--resume``.

``examples/distill_torch.py`` saves the AdamW state sharded under FSDP (``save_optimizer_shards``:
each rank writes its own part into ``optimizer/``) and loads it back the same way
(``load_optimizer_shards``). This measures that against what it did before, and still reads
from checkpoints of that layout: the whole state gathered to rank 0 and saved as one
``optimizer.pt``, loaded memory-mapped (``load_optimizer_state``: rank 0 reads each moment
through the mapping and sends each rank its slice) or read whole into every rank
(``mmap=False``). Measured: the rise of each rank's anonymous memory (``RssAnon``, sampled
every 2 ms, after ``malloc_trim`` hands freed heap back) while the state saves or loads, on 2
gloo ranks, for a stack of ``LAYERS`` square ``Linear(WIDTH)`` layers sharded as the example
shards a student (one ``fully_shard`` unit per layer and the root). Each load way runs in its
own processes, so none inherits another's freed memory. Every rank also checks that what it
loaded equals the shard it had before the save (moments, steps and learning rate), and that no file is still mapped once the
load returned (exits 1 if not).

    .venv/bin/python benches/fsdp_resume_memory.py [LAYERS] [WIDTH]   (default 8 2048: 33.6M
    parameters, a 256 MiB optimizer.pt)

Prints one JSON line per rank and way: ``way`` (``save-gathered``, ``save-sharded``, then the
loads ``sharded``, ``mmap``, ``whole``), ``rank``, ``file_mib`` (what was saved, all ranks'
parts together), ``shard_mib`` (this rank's part of the moments) and ``rise_mib``; the loads
also ``equal`` and ``still_mapped``.
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


# What each parameter's state holds, compared after a load (with the param groups' lr).
MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def anon_mib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def rank_main(way: str, work: str, layers: int, width: int) -> int:
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
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    mine = {k: {m: local(v[m]).clone() for m in MOMENTS} for k, v in get_optimizer_state_dict(model, opt)["state"].items()}
    shard_mib = sum(t.numel() * t.element_size() for v in mine.values() for m, t in v.items() if m != "step") / 2**20
    whole_pt = os.path.join(work, example.OPTIMIZER_FILE)
    parts = os.path.join(work, example.OPTIMIZER_DIR)

    def measured(run) -> int:
        """The peak rise of this rank's anonymous memory while ``run()`` runs, in MiB."""
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
            run()
        finally:
            done[0] = True
            sampler.join()
        return max(peak[0], anon_mib()) - base

    def line(way: str, saved_mib: float, rise: int, **more) -> None:
        # One write per line: the ranks share the pipe.
        sys.stdout.write(json.dumps({"way": way, "rank": rank, "file_mib": round(saved_mib, 1), "shard_mib": round(shard_mib, 1), "rise_mib": rise, **more}) + "\n")
        sys.stdout.flush()

    def parts_mib() -> float:
        return sum(os.path.getsize(os.path.join(parts, n)) for n in os.listdir(parts)) / 2**20

    if way == "save":
        def gathered() -> None:
            # What the example did before: the whole state gathered to rank 0, on the CPU.
            whole = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(whole, whole_pt)

        rise = measured(gathered)
        dist.barrier()
        line("save-gathered", os.path.getsize(whole_pt) / 2**20, rise)
        rise = measured(lambda: example.save_optimizer_shards(model, opt, work))
        dist.barrier()
        line("save-sharded", parts_mib(), rise)
        dist.barrier()
        dist.destroy_process_group()
        return 0
    # Another learning rate: the saved one (in the state's param groups) must come back.
    fresh = torch.optim.AdamW(model.parameters(), lr=2e-3)
    if way == "sharded":
        rise = measured(lambda: example.load_optimizer_shards(model, fresh, work))
        saved_mib = parts_mib()
    else:
        rise = measured(lambda: example.load_optimizer_state(model, fresh, whole_pt, True, torch.device("cpu"), mmap=(way == "mmap")))
        saved_mib = os.path.getsize(whole_pt) / 2**20
    gc.collect()
    with open("/proc/self/maps") as fh:
        mapped = any(work in line for line in fh)
    got = get_optimizer_state_dict(model, fresh)["state"]
    equal = all(torch.equal(local(got[k][m]), mine[k][m]) for k in mine for m in MOMENTS) and all(g["lr"] == 1e-3 for g in fresh.param_groups)
    line(way, saved_mib, rise, equal=equal, still_mapped=mapped)
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
        for way in ("save", "sharded", "mmap", "whole"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.abspath(__file__), way, work, str(layers), str(width)]
            done = subprocess.run(cmd, env=env)
            if done.returncode != 0:
                print(f"fsdp_resume_memory: the {way} run failed (exit {done.returncode})", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The collective DDP relies on, checked and timed: all_reduce across every process torchrun starts.

Each rank fills a tensor with its rank + 1 and all-reduces it (sum): every element must then equal
world x (world + 1) / 2 on every rank, for each size; the time of the largest all_reduce gives the bus
bandwidth as NCCL's own tests define it (2 (world - 1) / world x bytes / seconds). Backend: NCCL with one GPU
per rank where CUDA has a device for each, else gloo on the CPU (the same check, for CI and laptops).

    torchrun --standalone --nproc_per_node=<GPUs> benchmarks/allreduce.py [--mb 256] [--repeats 5]

Rank 0 prints one line per size and a final `allreduce: ok` (or exits non-zero with the mismatch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=256.0, help="largest tensor, MiB (float32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    world_local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_local
    backend = ("nccl" if cuda else "gloo") if args.backend == "auto" else args.backend
    device = torch.device(f"cuda:{local}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    want = world * (world + 1) / 2
    largest = max(1, int(args.mb * 2**20 / 4))
    sizes = sorted({1, 1024, 2**20 // 4, largest})
    failed = []
    for n in sizes:
        x = torch.full((n,), float(rank + 1), device=device)
        dist.all_reduce(x)
        if not torch.all(x == want):
            failed.append(f"{n} elements: got {x.unique().tolist()[:4]}, want {want}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        busbw = 2 * (world - 1) / world * n * 4 / seconds / 1e9 if world > 1 else float("nan")
        if rank == 0:
            print(f"allreduce {backend} world {world}: {n:11d} floats ({n * 4 / 2**20:9.3f} MiB) "
                  f"{1e3 * seconds:9.3f} ms bus bandwidth {busbw:8.2f} GB/s", flush=True)  # fmt: skip
    flags = torch.tensor([len(failed)], device=device)
    dist.all_reduce(flags)
    dist.destroy_process_group()
    if failed:
        sys.exit(f"error: allreduce rank {rank}: " + "; ".join(failed))
    if flags.item():
        sys.exit(f"error: allreduce: a mismatch on {int(flags.item())} rank(s)")
    if rank == 0:
        print(f"allreduce: ok ({backend}, world {world}, device {device.type})")


if __name__ == "__main__":
    main()

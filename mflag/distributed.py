"""Distributed set-up in one place: init from torchrun's environment, single-process fallback.

Seeds: the model is initialised from the base seed on every rank (identical replicas); data order
is shared, and each rank's augmentation draws from base + rank.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str) -> str:
    """auto -> cuda when available, else cpu."""
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pretrain.device is cuda but no CUDA device is visible")
    return preference


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with bf16
    instructions. On x86 that is AVX512-BF16 or AMX (``torch.cpu``'s ISA checks); elsewhere (ARM) it is
    what oneDNN reports. A CPU without them converts bf16 to fp32 around every kernel, slower than fp32:
    a ResNet-50 training step at batch 64 and 56 px, 2 threads, took 21.2 s in bf16 against 1.3 s in fp32
    on a 2-core AMD EPYC (AVX2), and 2.2 s against 1.3 s on a 2-core Xeon with AVX512 but no BF16
    extension, where oneDNN nonetheless reports bf16 support (docs/design.md, "Precision")."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # an older torch without the ISA checks
            return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def resolve_precision(preference: str, device: torch.device, key: str) -> str:
    """The precision a stage computes in. ``auto``: bf16 where `device` computes it natively
    (:func:`native_bf16`), else fp32. An explicit choice is kept; an explicit bf16 on a device that only
    emulates it is kept with a warning that names the params key `key`."""
    native = native_bf16(device)
    if preference == "auto":
        return "bf16" if native else "fp32"
    if preference == "bf16" and not native:
        print(f"warning: {key} is bf16, but this {device.type.upper()} has no native bf16 and torch emulates it, "
              f"many times slower than fp32; `{key}: auto` picks fp32 here", file=sys.stderr)  # fmt: skip
    return preference


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent() -> None:
    """End this process when its parent (the torchrun agent) dies.

    torchrun starts each worker in a session of its own, so a signal to torchrun's process group never
    reaches the workers. On SIGTERM or SIGINT torchrun stops them itself, but a torchrun killed outright
    (SIGKILL, an OOM kill) would leave them training as orphans. Linux: the kernel sends SIGTERM when the
    parent exits (prctl PR_SET_PDEATHSIG; torchrun's agent starts its workers from its main thread, whose
    exit is what counts). Elsewhere: a daemon thread polls the parent's pid.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before the request took effect
                os.kill(os.getpid(), signal.SIGTERM)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def init(preference: str = "auto") -> DistEnv:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any.

    A worker started by torchrun ends when torchrun does (:func:`exit_with_parent`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_parent()
    kind = resolve_device(preference)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


class WorldMismatch(RuntimeError):
    """torchrun started another world than the params describe."""


def check_world(env: DistEnv, nnodes: int, nproc: int) -> None:
    """Under torchrun, the world must be `nnodes` x `nproc` processes, `nproc` on this node: what the outputs
    record as the run's params. (Without torchrun, one process: the single-process fallback.)"""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    if (env.world_size, local) != (nnodes * nproc, nproc):
        raise WorldMismatch(
            f"torchrun started {env.world_size} process(es), {local} on this node, but pretrain.nnodes x "
            f"pretrain.nproc is {nnodes} x {nproc}: launch with --nnodes={nnodes} --nproc_per_node={nproc} "
            f"(dvc.yaml's command does), or change the params"
        )


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_across(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a tensor over ranks; identity in a single process. The reduction runs on the rank's device
    (NCCL reduces no CPU tensors) and the result comes back where `values` was."""
    if env.distributed:
        out = values.to(env.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        values = (out / env.world_size).to(values.device)
    return values


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()

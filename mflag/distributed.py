"""Distributed set-up in one place: init from torchrun's environment, single-process fallback.

Seeds: the model is initialised from the base seed on every rank (identical replicas); data order
is shared, and each rank's augmentation draws from base + rank.
"""

from __future__ import annotations

import os
import platform
import sys
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


def init(preference: str = "auto") -> DistEnv:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any."""
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


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_across(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a tensor over ranks (for logging); identity in a single process."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world_size
    return values


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()

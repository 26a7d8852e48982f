"""Which precision a stage computes in: `auto` picks bf16 only where the hardware has it."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from mflag import distributed
from mflag.distributed import native_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("native,want", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_native_bf16(monkeypatch, native, want):
    monkeypatch.setattr(distributed, "native_bf16", lambda device: native)
    assert resolve_precision("auto", CPU, "finetune.precision") == want


@pytest.mark.parametrize("choice", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("native", [True, False])
def test_explicit_choice_is_kept(monkeypatch, capsys, choice, native):
    monkeypatch.setattr(distributed, "native_bf16", lambda device: native)
    assert resolve_precision(choice, CPU, "pretrain.precision") == choice
    err = capsys.readouterr().err
    if choice == "bf16" and not native:  # kept, but the user is told it is emulated and what to set
        assert "pretrain.precision is bf16" in err and "pretrain.precision: auto" in err
    else:
        assert err == ""


def _cpu_flags() -> set[str] | None:
    info = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not info.is_file():
        return None
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_native_bf16_on_this_cpu_matches_its_flags():
    """Against the kernel's own list of CPU features: AVX512-BF16 or AMX-BF16 -> native; otherwise (AVX2
    only, or AVX512 without its BF16 extension, where oneDNN converts to fp32 around each kernel) not."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("needs an x86-64 Linux machine (/proc/cpuinfo flags)")
    assert native_bf16(CPU) is bool({"avx512_bf16", "amx_bf16"} & flags)


def test_cuda_answer_comes_from_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert native_bf16(torch.device("cuda", 0)) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert native_bf16(torch.device("cuda", 0)) is True

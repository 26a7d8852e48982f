"""The prepared GPU checks (scripts/device_checks.sh, benchmarks/allreduce.py, benchmarks/cell_cost.py) on a
CPU-only machine: the all_reduce check runs over gloo with two processes and finds the sum every rank must
hold, the device script stops cleanly, saying why, where there is no CUDA device, and the cell-cost benchmark
counts a ResNet-50 as torchvision publishes it."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # fmt: skip


def test_allreduce_over_gloo_with_two_processes_checks_the_sum_at_every_size():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "benchmarks/allreduce.py"), "--mb", "1", "--repeats", "1", "--backend", "gloo"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sizes = re.findall(r"allreduce gloo world 2: +(\d+) floats", proc.stdout)
    # 1 element, 1024, 1 MiB (2**18 float32): the largest is --mb's 1 MiB, listed once
    assert [int(s) for s in sizes] == [1, 1024, 2**18], proc.stdout
    assert "allreduce: ok (gloo, world 2, device cpu)" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_device_script_without_cuda_says_so_and_passes(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts/device_checks.sh"), str(tmp_path / "out")], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device" in (tmp_path / "out/summary.txt").read_text()
    assert "devices 0" in (tmp_path / "out/device.txt").read_text()


def test_cell_cost_counts_resnet50_as_torchvision_publishes_it():
    """benchmarks/cell_cost.py's operation counts: the frozen encoder's forward at 224 px against torchvision's
    own figure for ResNet-50 (4.089 G multiply-adds, the weights' `_ops` metadata, = 2 x 4.089 GFLOP), and the
    pretraining step about three forwards (backward = weight and input gradients, the first conv's input
    gradient skipped)."""
    spec = importlib.util.spec_from_file_location("cell_cost", REPO / "benchmarks/cell_cost.py")
    cell_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cell_cost)
    from torchvision.models import ResNet50_Weights

    cpu = torch.device("cpu")
    forward = cell_cost.flops_per_image(cell_cost.PATHS["cls"][0], cpu)
    published = 2e9 * ResNet50_Weights.IMAGENET1K_V1.meta["_ops"]
    assert forward == pytest.approx(published, rel=0.01)
    step = cell_cost.flops_per_image(cell_cost.PATHS["pretrain"][0], cpu)
    assert 2.9 < step / forward < 3.1

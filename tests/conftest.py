"""Shared test helpers: the repository's params with small overrides, and a tiny synthetic corpus."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mflag.config import parse
from mflag.params import Params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on a shared 2-core machine two OpenMP threads that spin-wait
    for each other run small convolutions several times slower. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A corpus small enough to build in a couple of seconds, with every finding and file variant present.
TINY_SYNTHETIC = {
    "workers": 2,
    "mimic": {"patients": 14, "lateral_prob": 0.5, "valid_patients": 0.2, "test_patients": 0.2,
              "p_no_findings": 0.2, "p_no_impression": 0.2, "hedge_prob": 0.4,
              "prevalence": {"consolidation": 0.4, "atelectasis": 0.3, "effusion": 0.4, "cardiomegaly": 0.3,
                             "edema": 0.3, "pneumothorax": 0.3, "covid": 0.2, "nodule": 0.3, "device": 0.3,
                             "foreign_object": 0.2}},
    "chexpert": {"train_patients": 10, "valid_patients": 4, "lateral_prob": 0.4, "hedge_prob": 0.4},
    "rsna": {"patients": 24, "prevalence": {"consolidation": 0.6, "effusion": 0.2, "device": 0.2}},
    "siim": {"images": 24, "sixteen_bit_prob": 0.35, "monochrome1_prob": 0.35,
             "prevalence": {"pneumothorax": 0.6, "device": 0.2}},
    "covidx": {"train_images": 14, "test_images": 6},
    "objcxr": {"train_images": 14, "dev_images": 6},
    "nih": {"train_val_images": 24, "test_images": 10, "rgba_prob": 0.3,
            "prevalence": {"consolidation": 0.4, "atelectasis": 0.3, "effusion": 0.4, "cardiomegaly": 0.3,
                           "edema": 0.3, "pneumothorax": 0.3, "nodule": 0.4, "device": 0.2}},
}  # fmt: skip


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "prevalence":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def repo_params_dict() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def params_with(override: dict) -> Params:
    return parse(Params, deep_merge(repo_params_dict(), override))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The tiny corpus, generated once per test session."""
    from mflag.synth.corpus import generate

    out = tmp_path_factory.mktemp("corpus")
    generate(params_with({"synthetic": TINY_SYNTHETIC}).synthetic, out, progress=False)
    return out


DATASETS = ("mimic", "chexpert", "rsna", "siim", "covidx", "objcxr", "nih")
# Tiny pretraining: the real ResNet-50, a few small steps.
# seed None: the run uses the top-level seed, so its trunk starts from init_random's weights
TINY_PRETRAIN = {"epochs": 2, "batch_size": 4, "crop": 32, "eval_batch_size": 16, "log_every": 1, "workers": 1,
                 "precision": "fp32", "seed": None}


def run_stage(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a stage script (or torchrun) the way dvc.yaml does, in `workdir`; fail with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(list(args), cwd=workdir, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{args}: {proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="session")
def stage_workdir(tiny_corpus, tmp_path_factory) -> Path:
    """A working folder whose params point every dataset root at the tiny corpus; split and
    preprocess have run for every dataset."""
    wd = tmp_path_factory.mktemp("stages")
    data = {"image_size": 40, "workers": 2}
    for ds in DATASETS:
        data[ds] = {"root": str(tiny_corpus / ds)}
    # a small corpus: larger valid/test shares so every split is populated
    data["rsna"].update(valid_fraction=0.25, test_fraction=0.25)
    data["siim"].update(valid_fraction=0.25, test_fraction=0.25)
    data["nih"].update(valid_fraction=0.3)
    params = deep_merge(repo_params_dict(), {"data": data, "synthetic": TINY_SYNTHETIC, "pretrain": TINY_PRETRAIN})
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for ds in DATASETS:
        for stage in ("split", "preprocess"):
            run_stage(wd, sys.executable, str(REPO / "stages" / f"{stage}.py"), ds)
    return wd

"""The finetune@<job>-<pct>-<init> cells as DVC runs them, on the tiny corpus with a random-init encoder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mflag.distributed import resolve_precision
from mflag.finetune.data import JOBS, load_task_data
from tests.conftest import REPO, deep_merge, run_stage

TINY_FINETUNE = {
    "cls": {"max_epochs": 3, "crop": 32, "batch_size": 8},
    "seg": {"max_epochs": 1, "input_size": 32, "balance": False, "decoder_channels": [16, 16, 8, 8, 8]},
    "det": {"max_epochs": 1, "input_size": 64, "neck_widths": [8, 16, 32]},  # 64: a 2x2 stride-32 map, so batch norm takes a batch of one
}


@pytest.fixture(scope="module")
def workdir(stage_workdir):
    wd = stage_workdir
    params = yaml.safe_load((wd / "params.yaml").read_text())
    (wd / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, {"finetune": TINY_FINETUNE}), sort_keys=False))
    run_stage(wd, sys.executable, str(REPO / "stages/init_random.py"))
    return wd


def _fraction_ids(wd, dataset: str, pct: int) -> list[str]:
    """Reference: the split file's train rows whose `pct` is at most `pct`, as written by the split stage."""
    split = pd.read_csv(wd / f"data/splits/{dataset}.csv", dtype={"image_id": str}, keep_default_na=False)
    pct_col = pd.to_numeric(split["pct"], errors="coerce")
    return sorted(split.loc[(split["split"] == "train") & (pct_col <= pct), "image_id"])


@pytest.mark.parametrize("job,pct,metric", [("cls_rsna", 1, "auc"), ("seg_siim", 10, "dice"), ("det_objcxr", 100, "map")])
def test_cell_trains_on_exactly_its_fraction(workdir, job, pct, metric):
    dataset = JOBS[job][1]
    want = _fraction_ids(workdir, dataset, pct)
    assert want, f"the tiny corpus has no {pct}% rows for {dataset}"
    if pct < 100:  # nested and strictly smaller, so the count below distinguishes the fractions
        assert len(want) < len(_fraction_ids(workdir, dataset, 100))
    data = load_task_data(workdir / "data/cache" / dataset, dataset, JOBS[job][0], pct)
    assert sorted(data.index["image_id"].iloc[data.train_rows]) == want
    run_stage(workdir, sys.executable, str(REPO / "stages/finetune.py"), job, str(pct), "random")
    out = json.loads((workdir / f"reports/finetune/{job}-{pct}-random/metrics.json").read_text())
    assert (out["job"], out["pct"], out["init"]) == (job, pct, "random")
    assert out["n_train"] == len(want)
    assert metric in out and (np.isnan(out[metric]) or 0.0 <= out[metric] <= 1.0)
    assert out["params"]["seed"] == 42 and JOBS[job][0] in out["params"]["finetune"]
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    want_precision = resolve_precision(params["finetune"]["precision"], torch.device("cpu"), "finetune.precision")
    assert out["params"]["precision_used"] == want_precision
    if JOBS[job][0] == "cls":  # several probes, seeds 42, 43, ...; the cell reports their mean
        n = params["finetune"]["cls"]["seeds"]
        assert out["seeds"] == list(range(42, 42 + n)) and [r["seed"] for r in out["per_seed"]] == out["seeds"]
        values = [r[metric] for r in out["per_seed"]]
        assert out[metric] == pytest.approx(float(np.mean(values)), nan_ok=True)
        assert all(r["best_epoch"] >= 1 and r["n_train"] == len(want) for r in out["per_seed"])
    else:
        assert out["best_epoch"] >= 1
    live = json.loads((workdir / f"reports/finetune/{job}-{pct}-random/live/metrics.json").read_text())
    # no timing and no Git revision in the outputs: identical runs must give identical bytes (dvc.lock)
    for key in ("seconds", "feature_seconds", "train_images_per_second", "git_revision"):
        assert key not in out and key not in live, key


def test_missing_imagenet_weights_fail_clearly(workdir):
    proc = subprocess.run([sys.executable, str(REPO / "stages/finetune.py"), "cls_rsna", "1", "imagenet"],
                          cwd=workdir, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})  # fmt: skip
    assert proc.returncode != 0
    assert "models/imagenet/vision_encoder.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_cell_arguments_print_usage(workdir):
    proc = subprocess.run([sys.executable, str(REPO / "stages/finetune.py"), "cls_mimic", "5", "mflag"],
                          cwd=workdir, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})  # fmt: skip
    assert proc.returncode != 0 and "usage" in proc.stderr and "Traceback" not in proc.stderr


def test_dvc_stage_lists_every_cell_with_its_own_deps():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]
    cells = stage["foreach"]
    expected = {f"{job}-{pct}-{init}": {"job": job, "pct": pct, "init": init, "task": task, "dataset": dataset}
                for job, (task, dataset) in JOBS.items() for pct in (1, 10, 100) for init in ("mflag", "random")}
    assert cells == expected
    do = stage["do"]
    # a cell reads its own dataset's cache and its own task's params, nothing wider
    assert "data/cache/${item.dataset}" in do["deps"] and "data/cache" not in do["deps"]
    # some of the library modules a cell imports from outside mflag/finetune (tests/test_stage_deps.py
    # checks all of them against what the cell actually loads)
    assert {"mflag/models.py", "mflag/resnet.py", "mflag/optim.py", "mflag/augment.py"} <= set(do["deps"])
    assert do["params"] == ["seed", "finetune.device", "finetune.precision", "finetune.${item.task}"]
    # a random-init cell must not depend on pretraining: its encoder path is templated on the init
    assert "models/${item.init}/vision_encoder.safetensors" in do["deps"]
    assert not any(s in str(d) for d in do["deps"] for s in ("models/mflag", "pretrain", "embeddings"))

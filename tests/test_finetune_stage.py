"""The finetune_<task>@<dataset>-<encoder> stages as DVC runs them, on the tiny corpus with a random-init
encoder: each cell (job x fraction x encoder) trains on exactly its fraction and writes its bootstrap replicates,
one process running a job's three fractions gives the same results as three processes running one fraction each
(the features they share change nothing), and an external checkpoint is one params entry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mflag.distributed import resolve_precision
from mflag.finetune.data import load_task_data
from mflag.jobs import JOBS
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
    dataset = JOBS[job].dataset
    want = _fraction_ids(workdir, dataset, pct)
    assert want, f"the tiny corpus has no {pct}% rows for {dataset}"
    if pct < 100:  # nested and strictly smaller, so the count below distinguishes the fractions
        assert len(want) < len(_fraction_ids(workdir, dataset, 100))
    data = load_task_data(workdir / "data/cache" / dataset, dataset, JOBS[job].task, pct)
    assert sorted(data.index["image_id"].iloc[data.train_rows]) == want
    run_stage(workdir, sys.executable, str(REPO / "stages/finetune.py"), job, "random", str(pct))
    out = json.loads((workdir / f"reports/finetune/{job}-{pct}-random/metrics.json").read_text())
    assert (out["job"], out["pct"], out["encoder"]) == (job, pct, "random")
    assert out["n_train"] == len(want)
    test_ids = data.index["image_id"].iloc[data.test_rows]
    assert out["test_cases"] == len(test_ids) and out["bootstrap"]["key"] == job
    # the replicates: one per resample, the metric recomputed on resampled test cases (mflag.stats, tested there)
    lines = (workdir / f"reports/finetune/{job}-{pct}-random/bootstrap.csv").read_text().splitlines()
    assert lines[0] == metric and len(lines) - 1 == params_of(workdir)["stats"]["resamples"]
    assert metric in out and (np.isnan(out[metric]) or 0.0 <= out[metric] <= 1.0)
    assert out["params"]["seed"] == 42 and JOBS[job].task in out["params"]["finetune"]
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    want_precision = resolve_precision(params["finetune"]["precision"], torch.device("cpu"), "finetune.precision")
    assert out["params"]["precision_used"] == want_precision
    if JOBS[job].task == "cls":  # several probes, seeds 42, 43, ...; the cell reports their mean
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
    _head_gives_the_metric(workdir, job, pct, data, out[metric])


def _head_gives_the_metric(wd, job: str, pct: int, data, value) -> None:
    """The cell's head file, loaded back (its encoder found from the recorded path, next to the head), predicts the
    test images so that the evaluator's metric on those predictions is the one metrics.json holds."""
    from mflag.finetune import detect, segment
    from mflag.finetune.classify import _metrics
    from mflag.finetune.heads import load_cell_model, predict

    model = load_cell_model(wd / f"models/finetune/{job}-{pct}-random/head.safetensors")
    meta, cfg, test = model.cell.meta, model.cell.config, data.test_rows
    assert (meta["job"], meta["pct"], meta["encoder"]["name"]) == (job, pct, "random")
    if model.cell.task == "cls":
        logits = predict(model, data.images)[:, test]  # every row, in the stage's feature batches
        got = np.mean([_metrics(data.kind, data.labels[test], z)[JOBS[job].metric] for z in logits])
    elif model.cell.task == "seg":
        logits = torch.from_numpy(predict(model, data.images[test]))
        _, masks = segment._resize(*(torch.from_numpy(np.asarray(a[test])) for a in (data.images, data.masks)),
                                   cfg.input_size)  # fmt: skip
        got = segment.dice_per_image((torch.sigmoid(logits) > segment.THRESHOLD).numpy(), masks[:, 0].numpy()).mean()
    else:
        truths = detect._scaled_truths(data.boxes, test, cfg.input_size / data.images.shape[-1])
        got = detect.coco_map(predict(model, data.images[test]), truths, cfg.iou_thresholds, cfg.drop_empty_test)
    assert (value is None and np.isnan(got)) or got == pytest.approx(value, rel=1e-9, abs=1e-12)


def _finetune(wd, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(REPO / "stages/finetune.py"), *args], cwd=wd, capture_output=True,
                          text=True, env=env)  # fmt: skip


def params_of(wd) -> dict:
    return yaml.safe_load((wd / "params.yaml").read_text())


IMAGENET = {"kind": "imagenet", "weights": "models/imagenet/resnet50.pth", "key_prefix": "",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip


def _with_encoder(workdir, tmp_path, name: str, spec: dict, dataset: str):
    """A working folder with one dataset's cache and params listing one more encoder."""
    wd = tmp_path / "wd"
    shutil.copytree(workdir / "data/cache" / dataset, wd / "data/cache" / dataset)
    params = params_of(workdir)
    params["encoders"][name] = spec
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return wd


def test_missing_imagenet_weights_fail_clearly(workdir, tmp_path):
    wd = _with_encoder(workdir, tmp_path, "imagenet", IMAGENET, "rsna")
    proc = _finetune(wd, "cls_rsna", "imagenet")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "models/imagenet/resnet50.pth" in proc.stderr and "download.pytorch.org" in proc.stderr


def test_an_encoder_not_listed_is_refused_with_the_listed_ones(workdir):
    proc = _finetune(workdir, "cls_rsna", "imagenet")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no encoder `imagenet`" in proc.stderr and "mflag, convirt, random" in proc.stderr


def test_an_external_checkpoint_is_one_params_entry(workdir, tmp_path):
    """A released checkpoint (MGCA-style: a Lightning file whose trunk sits under a key prefix, next to other
    modules) runs a cell from one `encoders` entry; the cell equals one run from the same trunk written by
    this pipeline (the random encoder re-saved), so the file was read into exactly that trunk."""
    import torchvision
    from safetensors.torch import load_file

    trunk = load_file(str(workdir / "models/random/vision_encoder.safetensors"))
    released = {f"img_encoder_q.model.{k}": v for k, v in trunk.items()}
    released |= {"img_encoder_q.model.fc.weight": torch.zeros(1000, 2048), "text_encoder_q.emb.weight": torch.ones(3, 4)}
    spec = {"kind": "checkpoint", "weights": "models/mgca/mgca_resnet_50.ckpt", "key_prefix": "img_encoder_q.model.",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # fmt: skip
    wd = _with_encoder(workdir, tmp_path, "mgca", spec, "rsna")
    (wd / "models/mgca").mkdir(parents=True)
    torch.save({"epoch": 49, "state_dict": released}, wd / spec["weights"])
    shutil.copytree(workdir / "models/random", wd / "models/random")
    assert set(torchvision.models.resnet50().state_dict()) - set(trunk) == {"fc.weight", "fc.bias"}
    for name in ("mgca", "random"):
        proc = _finetune(wd, "cls_rsna", name, "100")
        assert proc.returncode == 0, proc.stderr[-2000:]
    mine, theirs = (json.loads((wd / f"reports/finetune/cls_rsna-100-{e}/metrics.json").read_text())
                    for e in ("mgca", "random"))  # fmt: skip
    assert mine["auc"] == theirs["auc"] and mine["per_seed"] == theirs["per_seed"]
    assert mine["params"]["encoder"] == spec
    boot = [(wd / f"reports/finetune/cls_rsna-100-{e}/bootstrap.csv").read_text() for e in ("mgca", "random")]
    assert boot[0] == boot[1]


def test_imagenet_stand_in_weights_run_with_their_normalisation(workdir, tmp_path):
    """A stand-in for torchvision's ImageNet file (a ResNet-50 state dict, fc included) at the imagenet path runs a
    cell, recording the entry with its ImageNet normalisation."""
    import torchvision

    torch.manual_seed(0)
    wd = _with_encoder(workdir, tmp_path, "imagenet", IMAGENET, "rsna")
    (wd / "models/imagenet").mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), wd / IMAGENET["weights"])
    proc = _finetune(wd, "cls_rsna", "imagenet", "100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((wd / "reports/finetune/cls_rsna-100-imagenet/metrics.json").read_text())
    assert out["encoder"] == "imagenet" and 0 <= out["auc"] <= 1 and out["params"]["encoder"] == IMAGENET


def test_bad_cell_arguments_print_usage(workdir):
    proc = subprocess.run([sys.executable, str(REPO / "stages/finetune.py"), "cls_mimic", "mflag", "5"],
                          cwd=workdir, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})  # fmt: skip
    assert proc.returncode != 0 and "usage" in proc.stderr and "Traceback" not in proc.stderr


def _cell_outputs(wd, job: str) -> dict[int, tuple[bytes, bytes, bytes]]:
    out = {}
    for pct in (1, 10, 100):
        folder = wd / f"reports/finetune/{job}-{pct}-random"
        live = b"".join(p.read_bytes() for p in sorted((folder / "live").rglob("*")) if p.is_file())
        head = (wd / f"models/finetune/{job}-{pct}-random/head.safetensors").read_bytes()
        out[pct] = ((folder / "metrics.json").read_bytes(), live, head)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("job", ["cls_covidx", "seg_rsna", "det_rsna"])
def test_one_process_for_the_three_fractions_equals_one_process_each(workdir, job):
    """Reference: each fraction in a process of its own, which shares nothing with the other fractions."""
    for pct in ("1", "10", "100"):
        run_stage(workdir, sys.executable, str(REPO / "stages/finetune.py"), job, "random", pct)
    separate = _cell_outputs(workdir, job)
    proc = run_stage(workdir, sys.executable, str(REPO / "stages/finetune.py"), job, "random")
    assert _cell_outputs(workdir, job) == separate
    # progress: one line per epoch of each cell
    for pct in (1, 10, 100):
        assert re.search(rf"finetune {job}-{pct}-random epoch 1: ", proc.stdout), proc.stdout[-2000:]


# ---------------------------------------------------------------------------- hostile inputs: one class
def _strict_json(path) -> dict:
    """The file as strict JSON: a NaN or Infinity token fails the test."""

    def reject(token):
        raise AssertionError(f"{path}: {token} written")

    return json.loads(path.read_text(), parse_constant=reject)


def _broken_copy(workdir, tmp_path, dataset: str):
    """A working folder with the params, the random encoder and a copy of one dataset's cache, to edit."""
    wd = tmp_path / "wd"
    shutil.copytree(workdir / "data/cache" / dataset, wd / "data/cache" / dataset)
    shutil.copytree(workdir / "models/random", wd / "models/random")
    shutil.copy(workdir / "params.yaml", wd / "params.yaml")
    cache = wd / "data/cache" / dataset
    return wd, cache, pd.read_csv(cache / "index.csv", dtype={"image_id": str}, keep_default_na=False)



def test_a_train_subset_without_positives_stops_the_cell_with_job_fraction_and_subset_named(workdir, tmp_path):
    wd, cache, index = _broken_copy(workdir, tmp_path, "rsna")
    train = index["split"] == "train"
    index.loc[train, "target"] = 0  # RSNA with every Target 0
    index.to_csv(cache / "index.csv", index=False)
    proc = _finetune(wd, "cls_rsna", "random")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    n = int((train & (pd.to_numeric(index["pct"], errors="coerce") <= 1)).sum())
    assert (f"error: finetune cls_rsna-1-random: the train subset at 1% ({n} rows) has a single class (every target "
            "is 0): nothing can be learned from it; see data/splits/rsna.csv") in proc.stderr  # fmt: skip
    assert not (wd / "reports/finetune/cls_rsna-1-random/metrics.json").exists()


def test_valid_and_test_subsets_with_one_class_write_a_null_auc_with_its_reason(workdir, tmp_path):
    """The cell runs (exit 0): the valid subset's one class only warns (the validation loss picks the epoch), the
    test AUC is undefined and written as null with the reason; no NaN in metrics.json nor in live/."""
    wd, cache, index = _broken_copy(workdir, tmp_path, "rsna")
    index.loc[index["split"].isin(["valid", "test"]), "target"] = 0
    index.to_csv(cache / "index.csv", index=False)
    proc = run_stage(wd, sys.executable, str(REPO / "stages/finetune.py"), "cls_rsna", "random", "1")
    n_valid, n_test = (int((index["split"] == s).sum()) for s in ("valid", "test"))
    reason = f"the test subset ({n_test} rows) has a single class (every target is 0): AUC needs both classes"
    assert f"warning: finetune cls_rsna-1-random: auc not evaluable, written as null: {reason}" in proc.stderr
    assert f"warning: finetune cls_rsna-1-random: the valid subset ({n_valid} rows) has a single class" in proc.stderr
    assert "finetune cls_rsna-1-random: auc=n/a" in proc.stdout
    folder = wd / "reports/finetune/cls_rsna-1-random"
    out = _strict_json(folder / "metrics.json")
    assert out["auc"] is None and out["not_evaluable"] == reason
    assert out.get("auc_sd", None) is None and all(r["auc"] is None for r in out["per_seed"])
    assert out["n_train"] > 0 and all(r["best_epoch"] >= 1 for r in out["per_seed"])
    live = _strict_json(folder / "live/metrics.json")
    assert "valid_metric" not in live and "valid_loss" in live  # the undefined valid AUC is left out of the curves
    assert not (folder / "live/plots/metrics/valid_metric.tsv").exists()


def test_a_test_subset_without_a_box_writes_a_null_map_with_its_reason(workdir, tmp_path):
    wd, cache, index = _broken_copy(workdir, tmp_path, "rsna")
    boxes = pd.read_csv(cache / "boxes.csv", dtype={"image_id": str})
    test_ids = set(index.loc[index["split"] == "test", "image_id"])
    assert boxes["image_id"].isin(test_ids).any()  # the tiny corpus has test boxes to remove
    boxes[~boxes["image_id"].isin(test_ids)].to_csv(cache / "boxes.csv", index=False)
    proc = run_stage(wd, sys.executable, str(REPO / "stages/finetune.py"), "det_rsna", "random", "1")
    reason = f"the test subset ({len(test_ids)} rows) has no box: mAP needs a truth box"
    assert f"warning: finetune det_rsna-1-random: map not evaluable, written as null: {reason}" in proc.stderr
    out = _strict_json(wd / "reports/finetune/det_rsna-1-random/metrics.json")
    assert out["map"] is None and out["not_evaluable"] == reason and set(out["map_per_iou"]) == {None}

"""Linear-probe classification: metrics vs hand-computed AUCs and the pairwise definition, the frozen encoder,
early stopping, the feature cache, determinism, and the MoCo-style batched augmentation vs torchvision."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from torchvision.transforms import functional as TF

from sklearn.metrics import roc_auc_score

from mflag.augment import center_crop_normalize
from mflag.finetune import classify
from mflag.finetune.checks import SubsetCheck, SubsetError, cell_record, check_subsets
from mflag.finetune.classify import (
    ClassifyConfig,
    ProbeCases,
    _gaussian_blur,
    _metrics,
    accuracy,
    encode_features,
    linear_probe,
    macro_auc,
    moco_photometric,
    probe_over_seeds,
    random_crop_normalize,
)
from mflag.finetune.data import TaskData
from mflag.models import resnet50_trunk
from mflag.stats import interval, replicates, resample_indices

CPU = torch.device("cpu")


def cfg(**kw) -> ClassifyConfig:
    base = dict(lr=5e-4, weight_decay=1e-6, batch_size=48, max_epochs=50, patience=10, crop=32, upsample=0,
                augment=False, moco_aug=False, eval_batch_size=64, precision="fp32")  # fmt: skip
    base.update(kw)
    return ClassifyConfig(**base)


def small_cnn(seed: int = 0) -> nn.Module:
    """A stand-in encoder with BatchNorm layers: (B, 3, H, W) -> (B, 16)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def toy_images(n: int, side: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 noise images; label 1 images carry a bright block in the middle (learnable from crops)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    img = rng.integers(0, 120, (n, side, side)).astype(np.uint8)
    m = side // 2
    img[y == 1, m - 8 : m + 8, m - 8 : m + 8] += 120
    return img, y


def split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.arange(n)
    a, b = int(0.6 * n), int(0.8 * n)
    return r[:a], r[a:b], r[b:]


def task(labels: np.ndarray, kind: str, rows: tuple[np.ndarray, ...] | None = None,
         images: np.ndarray | None = None) -> TaskData:  # fmt: skip
    """A job's data; without ``images``, a placeholder cache (the probes on given features never read it)."""
    n = len(labels)
    tr, va, te = split(n) if rows is None else rows
    images = np.zeros((n, 1, 1), np.uint8) if images is None else images
    return TaskData(dataset="toy", images=images, index=pd.DataFrame(index=range(n)), train_rows=tr,
                    valid_rows=va, test_rows=te, labels=labels, kind=kind)  # fmt: skip


def pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """The AUC by its definition: P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = s[np.asarray(y) == 1], s[np.asarray(y) == 0]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


# ------------------------------------------------------------------------------------------ metrics
def auc(y, s) -> float:
    """One column's AUC as the cells compute it (a binary job's test AUC)."""
    return _metrics("binary", np.asarray(y, dtype=np.float32), np.asarray(s, dtype=np.float64))["auc"]


def test_auc_hand_cases():
    # pairs (pos, neg): (.35, .1) yes, (.35, .4) no, (.8, .1) yes, (.8, .4) yes -> 3 / 4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.0, 1.0]) == 1.0
    assert auc([0, 1], [1.0, 0.0]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one positive tied with one of two negatives: (1 + 0.5) / 2
    assert auc([1, 0, 0], [0.3, 0.3, 0.1]) == pytest.approx(0.75)
    # a single class: the AUC is undefined, NaN for a binary job, None (skipped) for a label of a multi-label one
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    macro, per = macro_auc(np.array([[1, 0], [1, 0], [1, 0]]), np.array([[0.1, 0.2], [0.2, 0.1], [0.3, 0.0]]))
    assert math.isnan(macro) and per == [None, None]
    with pytest.raises(ValueError):  # NaN scores are an error, not an AUC
        auc([0, 1, 0], [0.1, np.nan, 0.3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + 0.7 * y
    assert auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)
    s_ties = np.round(s, 0)  # heavy ties
    assert auc(y, s_ties) == pytest.approx(pairwise_auc(y, s_ties), abs=1e-12)
    s_int = rng.integers(0, 3, 200)
    assert macro_auc(y.astype(bool), s_int)[0] == pytest.approx(pairwise_auc(y, s_int), abs=1e-12)


def test_macro_auc_is_the_mean_over_labels_and_skips_single_class_labels():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (150, 5))
    s = rng.normal(size=(150, 5)) + y
    want = [pairwise_auc(y[:, k], s[:, k]) for k in range(5)]
    macro, per = macro_auc(y, s)
    assert per == pytest.approx(want, abs=1e-12)
    assert macro == pytest.approx(np.mean(want), abs=1e-12)
    y[:, 2] = 0
    macro, per = macro_auc(y, s)
    assert per[2] is None
    keep = [0, 1, 3, 4]
    assert per[:2] + per[3:] == pytest.approx([want[k] for k in keep], abs=1e-12)
    assert macro == pytest.approx(np.mean([want[k] for k in keep]), abs=1e-12)
    m = _metrics("multilabel", y.astype(np.float32), s)
    assert m["auc"] == macro and m["auc_per_label"] == per and m["auc_skipped"] == [2]


def test_multiclass_metrics_are_one_vs_rest():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[y]
    m = _metrics("multiclass", y, logits)
    prob = torch.softmax(torch.from_numpy(logits), 1).numpy()
    ovr = [pairwise_auc((y == c).astype(int), prob[:, c]) for c in range(3)]
    assert m["auc"] == pytest.approx(np.mean(ovr), abs=1e-12) and m["auc_skipped"] == []
    assert m["acc"] == pytest.approx(float(np.mean(logits.argmax(1) == y)))
    y_two = np.where(y == 2, 0, y)  # class 2 absent from the test rows: skipped from the AUC
    m = _metrics("multiclass", y_two, logits)
    ovr = [pairwise_auc((y_two == c).astype(int), prob[:, c]) for c in range(2)]
    assert m["auc"] == pytest.approx(np.mean(ovr), abs=1e-12) and m["auc_skipped"] == [2]


def test_accuracy_by_hand():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.1, 3.0], [1.0, 5.0, 2.0], [0.0, 0.0, -1.0]])
    assert accuracy(np.array([0, 2, 0, 0]), logits) == pytest.approx(0.75)
    assert accuracy(np.array([1, 0, 1]), np.array([0.3, -2.0, -0.1])) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------- augmentation
def test_random_crop_is_a_window_and_deterministic():
    x = torch.randint(0, 256, (6, 20, 24), dtype=torch.uint8)
    out = random_crop_normalize(x, 8, torch.Generator().manual_seed(0))
    again = random_crop_normalize(x, 8, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 8, 8) and torch.equal(out, again)
    for i in range(6):
        grey = ((out[i, 0] + 1.0) * 127.5).round().to(torch.uint8)
        hits = [(t, l) for t in range(13) for l in range(17) if torch.equal(x[i, t : t + 8, l : l + 8], grey)]
        assert hits, "every random crop is a window of its image"


def test_gaussian_blur_matches_torchvision():
    x = torch.rand(3, 3, 21, 21)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    got = _gaussian_blur(x, sigma)
    for i in range(3):
        ref = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)


def test_moco_photometric_range_and_determinism():
    x = random_crop_normalize(torch.randint(0, 256, (16, 24, 24), dtype=torch.uint8), 16, torch.Generator().manual_seed(1))
    a = moco_photometric(x, torch.Generator().manual_seed(5))
    b = moco_photometric(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert not torch.equal(a, x)
    flat = torch.zeros(4, 3, 16, 16)  # a mid-grey image: only brightness changes it, and uniformly
    out = moco_photometric(flat, torch.Generator().manual_seed(0))
    assert torch.allclose(out, out.mean(dim=(1, 2, 3), keepdim=True).expand_as(out), atol=1e-6)


# ---------------------------------------------------------------------------------------- encoder
def test_encode_features_matches_direct_forward_with_upsample():
    net = small_cnn()
    img, _ = toy_images(10)
    rows = np.array([7, 2, 5])
    c = cfg(upsample=48, eval_batch_size=2)
    got = encode_features(net, img, rows, c, CPU, progress=False)
    x = center_crop_normalize(torch.from_numpy(img[rows]), 32)
    x = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = net.eval()(x).numpy()
    assert got.shape == (3, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_encoder_stays_frozen_resnet50():
    trunk = resnet50_trunk()
    trunk.train()  # the probe must switch it to eval itself
    before = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
    assert any("num_batches_tracked" in k for k in before)
    img, y = toy_images(12)
    rows = np.arange(8), np.arange(8, 10), np.arange(10, 12)
    y[[8, 10]], y[[9, 11]] = 0, 1
    data = task(y, "binary", rows, images=img)
    res = linear_probe(trunk, data, cfg(augment=True, moco_aug=True, batch_size=8, max_epochs=2, eval_batch_size=8),
                       CPU, seed=0, progress=False)  # fmt: skip
    assert res["epochs_run"] == 2 and 0.0 <= res["auc"] <= 1.0
    after = trunk.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    for p in trunk.parameters():
        assert p.grad is None and not p.requires_grad


# ------------------------------------------------------------------------------------- the probe
def separable(kind: str, n: int = 240, d: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    if kind == "multiclass":
        y = rng.integers(0, 3, n)
        for c in range(3):
            x[y == c, c * 20 : (c + 1) * 20] += 3.0
        return x, y
    k = 5 if kind == "multilabel" else 1
    y = rng.integers(0, 2, (n, k)).astype(np.float32)
    for j in range(k):
        x[:, j * 20 : (j + 1) * 20] += 2.0 * (2 * y[:, j : j + 1] - 1)
    return x, (y if kind == "multilabel" else y[:, 0])


@pytest.mark.parametrize("kind", ["multilabel", "binary", "multiclass"])
def test_separable_features_are_learned(kind):
    x, y = separable(kind)
    data = task(y, kind)
    res = linear_probe(None, data, cfg(), CPU, seed=0, features=x, progress=False)
    assert res["n_train"] == len(data.train_rows)
    if kind == "multiclass":
        assert res["acc"] > 0.95 and res["auc"] > 0.95
    else:
        assert res["auc"] > 0.95
    if kind == "multilabel":
        assert len(res["auc_per_label"]) == 5 and res["auc_skipped"] == []


def test_early_stopping_returns_best_epoch_head():
    rng = np.random.default_rng(1)
    n, d = 240, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.8 * rng.normal(size=n) > 0).astype(np.float32)  # a weak, noisy signal
    _, va, _ = split(n)
    y_fit = y.copy()
    y_fit[va] = 1.0 - y_fit[va]  # validation labels the head cannot fit: its loss rises as it learns
    fit, fittable = task(y_fit, "binary"), task(y, "binary")
    history = []
    c = cfg(patience=2, max_epochs=40, lr=5e-3)
    res = linear_probe(None, fit, c, CPU, seed=3, features=x, log=history.append, progress=False)
    assert res["best_epoch"] < res["epochs_run"] < c.max_epochs
    assert res["epochs_run"] == res["best_epoch"] + c.patience
    assert [h["epoch"] for h in history] == list(range(1, res["epochs_run"] + 1))
    losses = [h["valid_loss"] for h in history]
    assert res["best_valid_loss"] == min(losses) == losses[res["best_epoch"] - 1]
    # reproduce: stopping the same run at the best epoch leaves exactly the best head
    again = linear_probe(None, fit, dataclasses.replace(c, max_epochs=res["best_epoch"]), CPU, seed=3, features=x,
                         progress=False)  # fmt: skip
    assert again["auc"] == res["auc"] and again["best_epoch"] == res["best_epoch"]
    # ... and the last epoch's head is a different one
    last = linear_probe(None, fit, dataclasses.replace(c, max_epochs=res["epochs_run"], patience=100), CPU, seed=3,
                        features=x, progress=False)  # fmt: skip
    assert last["best_epoch"] == res["best_epoch"] and last["auc"] == res["auc"]
    w = linear_probe(None, fittable, dataclasses.replace(c, max_epochs=res["epochs_run"], patience=100), CPU, seed=3,
                     features=x, progress=False)  # fmt: skip
    assert w["best_epoch"] > res["best_epoch"]  # with fittable validation labels the search goes on
    assert w["auc"] != res["auc"]


def test_same_seed_same_result_on_the_fly_with_augmentation():
    img, y = toy_images(30, seed=2)
    data = task(y, "binary", images=img)
    c = cfg(augment=True, moco_aug=True, batch_size=6, max_epochs=2, eval_batch_size=16)
    runs = [linear_probe(small_cnn(), data, c, CPU, seed=s, progress=False) for s in (4, 4, 5)]
    assert runs[0] == runs[1]
    assert runs[0]["auc"] != runs[2]["auc"] or runs[0]["best_valid_loss"] != runs[2]["best_valid_loss"]
    x, ym = separable("multiclass", n=120, d=32)
    a, b = (linear_probe(None, task(ym, "multiclass"), cfg(max_epochs=5), CPU, seed=9, features=x, progress=False)
            for _ in range(2))  # fmt: skip
    assert a == b


def test_feature_cache_matches_on_the_fly_path():
    img, y = toy_images(60, seed=4)
    data = task(y, "binary", images=img)
    c = cfg(batch_size=8, max_epochs=6, eval_batch_size=16, lr=5e-3)
    net = small_cnn(1)
    logs = {k: [] for k in ("cached", "given", "fly")}
    cached = linear_probe(net, data, c, CPU, seed=7, log=logs["cached"].append, progress=False)
    feats = encode_features(net, img, np.arange(60), c, CPU, progress=False)
    given = linear_probe(None, task(y, "binary"), c, CPU, seed=7, features=feats, log=logs["given"].append,
                         progress=False)  # fmt: skip
    fly = linear_probe(net, data, c, CPU, seed=7, cache_features=False, log=logs["fly"].append, progress=False)
    for other, name in ((given, "given"), (fly, "fly")):
        assert other["best_epoch"] == cached["best_epoch"] and other["epochs_run"] == cached["epochs_run"]
        assert other["auc"] == pytest.approx(cached["auc"], abs=1e-6)
        for h0, h1 in zip(logs["cached"], logs[name]):
            for k in ("train_loss", "valid_loss", "valid_metric"):
                assert h1[k] == pytest.approx(h0[k], rel=1e-4, abs=1e-6), (name, k)
    assert cached["epochs_run"] == 6 and len(logs["fly"]) == 6


# ---------------------------------------------------------------------------------- several seeds
def _same_run(got: dict, want: dict) -> None:
    """One seed of probe_over_seeds (heads trained together) against linear_probe alone: the same epochs,
    and the same numbers up to floating-point summation order."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), k
        elif k == "auc_per_label":
            assert got[k] == pytest.approx(v, abs=1e-6), k
        else:
            assert got[k] == v, k


@pytest.mark.parametrize("kind", ["multilabel", "binary", "multiclass"])
def test_probe_over_seeds_is_the_mean_of_independent_probes(kind):
    x, y = separable(kind, n=160, d=64, seed=1)
    x += np.random.default_rng(2).normal(scale=4.0, size=x.shape).astype(np.float32)  # not perfectly separable
    data = task(y, kind)
    c = cfg(max_epochs=30, patience=3, batch_size=16, lr=3e-2)
    seeds = [7, 3, 11, 20, 5]
    single_logs = [[] for _ in seeds]
    single = [linear_probe(None, data, c, CPU, seed=s, features=x, log=single_logs[i].append, progress=False)
              for i, s in enumerate(seeds)]  # fmt: skip
    # the heads stop at different epochs, so a stopped head leaving the batch is exercised
    assert len({r["epochs_run"] for r in single}) > 1 and min(r["epochs_run"] for r in single) < c.max_epochs
    history = []
    got = probe_over_seeds(None, data, c, CPU, seeds, features=x, log=history.append, progress=False)
    assert got["seeds"] == seeds and got["n_train"] == len(data.train_rows)
    assert [r["seed"] for r in got["per_seed"]] == seeds
    for run, want in zip(got["per_seed"], single):
        _same_run({k: v for k, v in run.items() if k != "seed"}, want)
    metric = "acc" if kind == "multiclass" else "auc"
    values = [r[metric] for r in single]
    assert len(set(values)) > 1  # the seeds do differ, so the mean and SD are not trivially one value
    mean = sum(values) / len(values)
    assert got[metric] == pytest.approx(mean, abs=1e-6)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    assert got[f"{metric}_sd"] == pytest.approx(sd, abs=1e-6)
    if kind == "multilabel":
        for k in range(5):
            want = sum(r["auc_per_label"][k] for r in single) / len(seeds)
            assert got["auc_per_label"][k] == pytest.approx(want, abs=1e-6)
    assert [h["epoch"] for h in history] == [h["epoch"] for h in single_logs[0]]  # the first seed's curve
    for h, want in zip(history, single_logs[0]):
        assert {k: h[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_probe_over_seeds_keeps_the_last_heads_when_validation_is_nan():
    x, y = separable("binary", n=120, d=32)
    data = task(y, "binary")
    x[data.valid_rows[0]] = np.nan  # every validation loss NaN: each probe stops after `patience`, last head kept
    c = cfg(max_epochs=10, patience=3, batch_size=16)
    single = [linear_probe(None, data, c, CPU, seed=s, features=x, progress=False) for s in (1, 2)]
    assert [r["epochs_run"] for r in single] == [3, 3] and math.isnan(single[0]["best_valid_loss"])
    got = probe_over_seeds(None, data, c, CPU, [1, 2], features=x, progress=False)
    for run, want in zip(got["per_seed"], single):
        _same_run({k: v for k, v in run.items() if k != "seed"}, want)


def test_probe_over_one_seed_is_that_probe_without_an_sd():
    x, y = separable("binary", n=120, d=64)
    data = task(y, "binary")
    c = cfg(max_epochs=3)
    one = linear_probe(None, data, c, CPU, seed=5, features=x, progress=False)
    got = probe_over_seeds(None, data, c, CPU, [5], features=x, progress=False)
    assert "auc_sd" not in got and got["per_seed"][0]["seed"] == 5
    _same_run({k: v for k, v in got["per_seed"][0].items() if k != "seed"}, one)
    assert got["auc"] == got["per_seed"][0]["auc"]
    with pytest.raises(ValueError, match="repeat"):
        probe_over_seeds(None, data, c, CPU, [5, 5], features=x, progress=False)
    with pytest.raises(ValueError, match="at least one"):
        probe_over_seeds(None, data, c, CPU, [], features=x, progress=False)


def test_config_from_params_follows_finetune_cls():
    from mflag.params import load

    c = load().finetune.cls
    for augment in (False, True):
        p = dataclasses.replace(c, augment=augment)
        for dataset, pct in (("chexpert", 1), ("rsna", 10), ("covidx", 100)):
            got = ClassifyConfig.from_params(p, dataset, pct, "bf16")
            assert got == ClassifyConfig.from_params(p, dataset, 100, "bf16")  # the same for every fraction
            for name in ("lr", "weight_decay", "batch_size", "max_epochs", "patience", "crop", "upsample",
                         "augment", "eval_batch_size"):  # fmt: skip
                assert getattr(got, name) == getattr(p, name), name
            assert got.precision == "bf16"
            assert got.moco_aug is (augment and dataset == "chexpert")  # MoCo-v2 jitter: CheXpert's protocol only


# ------------------------------------------------------------------------- subsets with a single class
def _strict(record: dict) -> dict:
    """The record through strict JSON, as mflag.io.write_json writes it and collate reads it."""
    import json

    def reject(token):
        raise AssertionError(f"{token} written")

    return json.loads(json.dumps(record, allow_nan=False), parse_constant=reject)


@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_a_train_subset_without_positives_stops_the_cell(kind):
    """Nothing can be learned without a positive (RSNA with every Target 0): the cell stops, and the message
    names the subset and the fraction (the stage adds the cell's name)."""
    _, y = separable(kind, n=60, d=16)
    tr, _, _ = split(len(y))
    y[tr] = 0  # multi-label: every label column 0 in train
    with pytest.raises(SubsetError, match=rf"the train subset at 10% \({len(tr)} rows\) has a single class .*: "
                                          "nothing can be learned from it"):  # fmt: skip
        check_subsets(task(y, kind), "cls", 10)
    if kind == "multilabel":  # one label column without a positive is not enough to stop: that label is skipped
        _, y = separable(kind, n=60, d=16)
        y[tr, 2] = 0
        assert check_subsets(task(y, kind), "cls", 10) == SubsetCheck()


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_a_train_subset_of_one_class_with_positives_runs_with_a_warning(kind):
    """Positives only, or one class of three: what the 1 % subset of a small corpus gives (the split keeps a
    positive in every fraction, docs/contracts.md), so the cell runs and says that its metric says little."""
    x, y = separable(kind, n=60, d=16)
    tr, _, _ = split(len(y))
    y[tr] = 1  # multi-label: every label column 1 in train
    data = task(y, kind)
    check = check_subsets(data, "cls", 1)
    assert check.not_evaluable is None
    assert check.warnings == [f"the train subset at 1% ({len(tr)} rows) has a single class "
                              + ("in every label (label 0 1, label 1 1, label 2 1, label 3 1, label 4 1)"
                                 if kind == "multilabel" else "(every label is 1)")
                              + ": the head sees no other class, so its test metric says little"]  # fmt: skip
    result = probe_over_seeds(None, data, cfg(max_epochs=2), CPU, [1], features=x, progress=False)
    record = _strict(cell_record(result, "acc" if kind == "multiclass" else "auc"))
    assert record["n_train"] == len(tr) and "not_evaluable" not in record


def test_single_class_messages_name_the_dataset_labels():
    y = np.zeros((30, 5), np.float32)
    y[:18:2] = 1  # train holds both classes
    y[24:, 1] = 1  # test: every column one value, Cardiomegaly all 1
    data = dataclasses.replace(task(y, "multilabel"), dataset="chexpert")
    got = check_subsets(data, "cls", 1).not_evaluable
    assert got == ("the test subset (6 rows) has a single class in every label (Atelectasis 0, Cardiomegaly 1, "
                   "Consolidation 0, Edema 0, Pleural Effusion 0): AUC needs both classes")  # fmt: skip
    y = np.zeros(30, np.int64)
    y[:18:3] = 2
    data = dataclasses.replace(task(y, "multiclass"), dataset="covidx")
    check = check_subsets(data, "cls", 100)
    assert check.not_evaluable is None  # accuracy is defined on one class
    assert [w.split(":")[0] for w in check.warnings] == [
        "the valid subset (6 rows) has a single class (every label is normal)",
        "the test subset (6 rows) has a single class (every label is normal)",
    ]


@pytest.mark.parametrize("kind", ["binary", "multilabel", "multiclass"])
def test_a_test_subset_with_one_class_makes_the_auc_not_evaluable(kind):
    """The probe runs (the valid subset picks the epoch); AUC is undefined on one class, so the cell writes it
    as null with the reason, and no NaN anywhere. Accuracy (COVIDx) is defined on one class: it is kept."""
    x, y = separable(kind, n=120, d=32)
    y = y.copy()
    _, _, te = split(len(y))
    y[te] = 0
    data = task(y, kind)
    check = check_subsets(data, "cls", 1)
    result = probe_over_seeds(None, data, cfg(max_epochs=5), CPU, [1, 2], features=x, progress=False)
    record = _strict(cell_record(result, "acc" if kind == "multiclass" else "auc", check.not_evaluable))
    if kind == "multiclass":
        assert check.not_evaluable is None and "not_evaluable" not in record
        assert 0.0 <= record["acc"] <= 1.0 and "auc" not in record  # one-vs-rest AUC skipped, as before
        assert check.warnings and "test subset (24 rows) has a single class" in check.warnings[0]
        return
    assert record["auc"] is None and record["auc_sd"] is None
    assert record["not_evaluable"] == check.not_evaluable
    assert check.not_evaluable.startswith("the test subset (24 rows) has a single class")
    assert check.not_evaluable.endswith("AUC needs both classes") and not check.warnings
    assert [r["auc"] for r in record["per_seed"]] == [None, None]
    if kind == "multilabel":
        assert record["auc_per_label"] == [None] * 5  # each label undefined, skipped as before


def test_a_multilabel_test_label_with_one_class_is_skipped_and_the_macro_auc_kept():
    x, y = separable("multilabel", n=120, d=32)
    _, _, te = split(len(y))
    y[te, 3] = 1
    data = task(y, "multilabel")
    check = check_subsets(data, "cls", 1)
    assert check.not_evaluable is None and not check.warnings
    record = _strict(cell_record(probe_over_seeds(None, data, cfg(max_epochs=5), CPU, [1, 2], features=x,
                                                  progress=False), "auc", check.not_evaluable))  # fmt: skip
    per_label = record["auc_per_label"]
    assert per_label[3] is None and all(a is not None for k, a in enumerate(per_label) if k != 3)
    assert record["auc"] == pytest.approx(np.mean([a for a in record["auc_per_label"] if a is not None]))
    assert "not_evaluable" not in record


def test_a_valid_subset_with_one_class_runs_with_a_warning():
    """The validation loss that picks the epoch is defined on one class; the logged AUC is not (NaN in the log,
    which the stage leaves out of live/)."""
    x, y = separable("binary", n=120, d=32)
    _, va, _ = split(len(y))
    y[va] = 1
    data = task(y, "binary")
    check = check_subsets(data, "cls", 100)
    assert check.not_evaluable is None
    assert check.warnings == ["the valid subset (24 rows) has a single class (every label is 1): the epoch is picked "
                              "on the validation loss of that class alone"]  # fmt: skip
    log = []
    record = _strict(cell_record(probe_over_seeds(None, data, cfg(max_epochs=3), CPU, [1], features=x, log=log.append,
                                                  progress=False), "auc"))  # fmt: skip
    assert 0.5 < record["auc"] <= 1.0 and all(math.isnan(h["valid_metric"]) for h in log)


# ------------------------------------------------------------------------- the encoder's normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RecordingTrunk(nn.Module):
    """A trunk stub: keeps every input batch it is given; features are the (B, 3) channel means."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().float().clone())
        return x.mean((2, 3))


def normalised_by_hand(images_u8: np.ndarray, crop: int, mean, std) -> np.ndarray:
    """Centre crop, grey in [0, 1], 3 channels, (x - mean_c) / std_c, in float64 (crops with an even margin)."""
    n, h, w = images_u8.shape
    assert (h - crop) % 2 == 0 and (w - crop) % 2 == 0
    top, left = (h - crop) // 2, (w - crop) // 2
    v = images_u8[:, top : top + crop, left : left + crop].astype(np.float64) / 255.0
    return (v[:, None] - np.asarray(mean)[None, :, None, None]) / np.asarray(std)[None, :, None, None]


def test_the_encoders_mean_and_std_reach_its_input():
    img, _ = toy_images(6, side=40, seed=3)
    rows = np.array([4, 0, 5])
    trunk = RecordingTrunk()
    c = dataclasses.replace(cfg(eval_batch_size=2), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    feats = encode_features(trunk, img, rows, c, CPU, progress=False)
    got = torch.cat(trunk.inputs).numpy()
    want = normalised_by_hand(img[rows], 32, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(feats, want.mean((2, 3)), rtol=0, atol=2e-6)
    # the default (0.5, 0.5): the historical input bit for bit, and equal to the formula
    trunk = RecordingTrunk()
    encode_features(trunk, img, rows, cfg(), CPU, progress=False)
    default = torch.cat(trunk.inputs)
    assert torch.equal(default, center_crop_normalize(torch.from_numpy(img[rows]), 32))
    np.testing.assert_allclose(default.numpy(), normalised_by_hand(img[rows], 32, (0.5,) * 3, (0.5,) * 3), atol=1e-6)
    # upsampled after normalising (bilinear is linear: the order does not matter)
    trunk = RecordingTrunk()
    encode_features(trunk, img, rows, dataclasses.replace(c, upsample=48), CPU, progress=False)
    up = torch.nn.functional.interpolate(torch.from_numpy(want), size=(48, 48), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(torch.cat(trunk.inputs).numpy(), up.numpy(), rtol=0, atol=1e-5)  # float32 interpolation


def test_random_training_crops_are_normalised_for_the_encoder():
    """On the fly (augment): each training crop reaches the trunk as (grey - mean_c) / std_c with one grey image
    in every channel, at the 1/255 levels of the uint8 cache."""
    img, y = toy_images(30, seed=2)
    trunk = RecordingTrunk()
    c = dataclasses.replace(cfg(augment=True, batch_size=6, max_epochs=1, eval_batch_size=16), mean=IMAGENET_MEAN,
                            std=IMAGENET_STD)  # fmt: skip
    linear_probe(trunk, task(y, "binary", images=img), c, CPU, seed=0, progress=False)
    x = torch.cat(trunk.inputs).double().numpy()  # train batches, then valid and test centre crops
    grey = x * np.asarray(IMAGENET_STD)[None, :, None, None] + np.asarray(IMAGENET_MEAN)[None, :, None, None]
    np.testing.assert_allclose(grey, np.repeat(grey[:, :1], 3, axis=1), atol=2e-6)
    np.testing.assert_allclose(grey * 255, np.round(grey * 255), atol=5e-4)
    assert len(x) == 30 and grey.min() >= -1e-6 and grey.max() <= 1 + 1e-6


def test_normalisation_config_is_checked():
    c = dataclasses.replace(cfg(), mean=[0.485, 0.456, 0.406], std=[1, 1, 1])
    assert c.mean == IMAGENET_MEAN and c.std == (1.0, 1.0, 1.0)  # lists from params become tuples of floats
    with pytest.raises(ValueError, match="mean must be 3"):
        dataclasses.replace(cfg(), mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be > 0"):
        dataclasses.replace(cfg(), std=(0.5, 0.0, 0.5))


# ---------------------------------------------------------------------------------- bootstrap evidence
def sklearn_replicate(scores: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> float:
    """The reference: on the explicitly resampled arrays, each probe's macro AUC by roc_auc_score over the labels
    with both classes (NaN when none has), then the mean over probes."""
    per_probe = []
    for s in scores:
        aucs = [roc_auc_score(labels[rows, k], s[rows, k]) for k in range(labels.shape[1])
                if len(np.unique(labels[rows, k])) == 2]  # fmt: skip
        per_probe.append(np.mean(aucs) if aucs else np.nan)
    return float(np.mean(per_probe))


def test_auc_replicates_match_sklearn_on_resampled_arrays(monkeypatch):
    rng = np.random.default_rng(5)
    p, n, k = 3, 30, 3
    y = rng.integers(0, 2, (n, k)).astype(bool)
    y[:, 2] = False
    y[[3, 17], 2] = True  # a rare label: resamples without either case hold one class of it
    scores = (np.round(rng.normal(size=(p, n, k)) + y, 1)).astype(np.float32)  # rounded: ties, also across classes
    only_negatives_of_0 = np.resize(np.flatnonzero(~y[:, 0]), n)  # label 0 has one class: skipped
    idx = np.vstack([resample_indices(n, 40, 0, "auc"), np.arange(n), only_negatives_of_0, np.full(n, 3)])
    cases = ProbeCases("auc", scores, y)
    got = replicates(cases, idx)
    want = np.array([sklearn_replicate(scores, y, rows) for rows in idx])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.isnan(got[-1]) and np.isnan(want[-1])  # one case drawn n times: every label has one class
    skipped_2 = [b for b, rows in enumerate(idx[:40]) if not y[rows, 2].any()]
    assert skipped_2 and not np.isnan(got[skipped_2]).any()  # the rare label is skipped, the others kept
    # the ranks are computed in chunks of resamples; the chunking changes nothing
    monkeypatch.setattr(classify, "REPLICATE_CHUNK", 200)
    np.testing.assert_allclose(replicates(cases, idx), got, rtol=0, atol=1e-12)


def test_accuracy_replicates_by_hand():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, 25, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 25)
    idx = np.vstack([resample_indices(25, 20, 0, "acc"), np.arange(25)])
    want = [np.mean([np.mean(z[rows].argmax(1) == labels[rows]) for z in logits]) for rows in idx]
    np.testing.assert_allclose(replicates(ProbeCases("acc", logits, labels), idx), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["multilabel", "binary", "multiclass"])
def test_probe_cases_reproduce_the_cells_metric(kind):
    x, y = separable(kind, n=160, d=64, seed=1)
    x += np.random.default_rng(2).normal(scale=4.0, size=x.shape).astype(np.float32)
    tr, va, te = split(160)
    te = np.random.default_rng(0).permutation(te)  # the evidence follows test_rows, whatever their order
    data = task(y, kind, rows=(tr, va, te))
    res = probe_over_seeds(None, data, cfg(max_epochs=8, patience=3, batch_size=16, lr=3e-2), CPU, [7, 3, 11],
                           features=x, progress=False)  # fmt: skip
    cases = res["cases"]
    metric = "acc" if kind == "multiclass" else "auc"
    assert cases.metric == metric and cases.n == len(te) and cases.scores.shape[:2] == (3, len(te))
    np.testing.assert_array_equal(cases.labels.reshape(len(te), -1), np.asarray(y)[te].reshape(len(te), -1))
    assert replicates(cases, np.arange(len(te))[None])[0] == pytest.approx(res[metric], abs=1e-12)
    for s, run in zip(cases.scores, res["per_seed"]):  # each probe's logits give that probe's own metric
        assert _metrics(kind, np.asarray(y)[te], s.reshape(len(te), -1) if kind != "binary" else s[:, 0])[metric] \
            == pytest.approx(run[metric], abs=1e-12)
    assert isinstance(cases.scores, np.ndarray) and cases.scores.dtype == np.float32


def test_probe_cases_on_the_fly():
    img, y = toy_images(30, seed=2)
    data = task(y, "binary", images=img)
    c = cfg(augment=True, batch_size=6, max_epochs=2, eval_batch_size=16)
    res = probe_over_seeds(small_cnn(), data, c, CPU, [4, 5], progress=False)
    assert res["cases"].scores.shape == (2, len(data.test_rows), 1)
    assert replicates(res["cases"], np.arange(len(data.test_rows))[None])[0] == pytest.approx(res["auc"], abs=1e-12)


def test_a_test_subset_with_one_class_has_no_interval():
    x, y = separable("binary", n=120, d=32)
    y = y.copy()
    _, _, te = split(len(y))
    y[te] = 0
    res = probe_over_seeds(None, task(y, "binary"), cfg(max_epochs=3), CPU, [1], features=x, progress=False)
    reps = replicates(res["cases"], resample_indices(len(te), 200, 42, "cls_rsna"))
    assert np.isnan(reps).all() and interval(reps, 0.95) == (None, None)


# ------------------------------------------------------------------------------------------ learnability
def test_the_probe_learns_an_obvious_task_from_a_random_resnet50_trunk():
    """Learnability, as for the segmenter and the detector: images whose label is whether they hold a bright
    square somewhere (place and size drawn), through a random-init ResNet-50 (the `random` encoder's kind) and
    the stage's own path (features once, probes over 3 seeds). A probe that cannot read this has a bug, not a
    hard task. Seeds fixed before the run; threshold 0.9 AUC."""
    rng = np.random.default_rng(7)
    n, side = 240, 64
    y = rng.integers(0, 2, n).astype(np.float32)
    img = rng.integers(0, 90, (n, side, side)).astype(np.uint8)
    for i in np.flatnonzero(y):
        s = int(rng.integers(14, 22))
        r, c = rng.integers(4, side - s - 4, 2)
        img[i, r : r + s, c : c + s] = 230
    torch.manual_seed(0)
    trunk = resnet50_trunk()
    data = task(y, "binary", images=img)
    config = cfg(crop=56, max_epochs=100)
    feats = classify.encode_features(trunk, img, np.arange(n), config, CPU, progress=False)
    res = classify.probe_over_seeds(trunk, data, config, CPU, [0, 1, 2], features=feats, progress=False)
    assert res["auc"] >= 0.9, res["auc"]

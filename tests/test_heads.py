"""A cell's head file (mflag.finetune.heads): a tiny cell of each task trained by its evaluator, its head saved as
the stage saves it and loaded back into the whole model, whose predictions on the test images are the ones the
evaluator scored (reference: the evaluator's own test outputs, and its metric recomputed from the loaded model's
predictions); the file holds only the trained tensors, with the same bytes for the same head; clear errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mflag.augment import center_crop_normalize
from mflag.encoders import Encoder, load_encoder
from mflag.finetune.classify import ClassifyConfig, accuracy, probe_over_seeds
from mflag.finetune.data import HALF, TaskData
from mflag.finetune.detect import DetectConfig, coco_map, train_detector
from mflag.io import file_sha256
from mflag.finetune.heads import (
    META_KEY,
    HeadError,
    head_metadata,
    load_cell_model,
    predict,
    read_head,
    save_head,
)
from mflag.finetune.segment import SegmentConfig, dice_per_image, train_segmenter
from mflag.jobs import JOBS
from mflag.models import resnet50_trunk, save_trunk

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEED = 42


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A random ResNet-50 trunk written as the pipeline writes an encoder, and its Encoder entry."""
    root = tmp_path_factory.mktemp("heads")
    path = root / "models/random/vision_encoder.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_trunk(resnet50_trunk(), path, init="random, seed 0")
    enc = Encoder("random", "random", path, "", HALF, HALF)
    return enc, load_encoder(enc), file_sha256(path)


def _squares(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Bright squares on dark noise (every third image empty): images, masks and boxes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
    masks = np.zeros_like(images)
    boxes = {}
    for i in range(n):
        if i % 3 == 2:
            continue
        side = int(rng.integers(size // 4, size // 2 + 1))
        r, c = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        masks[i, r : r + side, c : c + side] = 1
        images[i, r : r + side, c : c + side] = 230
        boxes[i] = np.array([[c, r, c + side, r + side]], np.float32)
    return images, masks, boxes


def _task(images, train, valid, test, **kw) -> TaskData:
    return TaskData(dataset=kw.pop("dataset", "toy"), images=images, index=pd.DataFrame(index=range(len(images))),
                    train_rows=np.asarray(train), valid_rows=np.asarray(valid), test_rows=np.asarray(test), **kw)  # fmt: skip


def _save(tmp_path, job: str, enc_fixture, cfg, res: dict, seeds: list[int], kind: str = ""):
    enc, _, sha = enc_fixture
    path = tmp_path / f"models/finetune/{job}-1-random/head.safetensors"
    head = res.pop("head")
    save_head(path, head, head_metadata(JOBS[job], 1, enc, sha, cfg, head, seeds, kind))
    return path, head


def _only_trained(path, model, frozen: str) -> None:
    """The file holds exactly the model's tensors outside the frozen encoder, and one metadata entry."""
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {k for k in model.state_dict() if not k.startswith(frozen)} and not any(k.startswith(frozen) for k in keys)
    assert list(meta) == [META_KEY]


@pytest.mark.parametrize("augment", [False, True], ids=["cached-features", "on-the-fly"])
def test_cls_head_reproduces_the_probes_test_logits(encoder, tmp_path, augment):
    _, state, _ = encoder
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 30)
    images = rng.integers(0, 90, (30, 40, 40)).astype(np.uint8)
    for k in range(3):  # class k: a bright block at one of three places
        images[labels == k, 4 + 10 * k : 14 + 10 * k, 12:28] += 150
    data = _task(images, np.arange(18), np.arange(18, 24), np.arange(24, 30), labels=labels, kind="multiclass",
                 dataset="covidx")  # fmt: skip
    cfg = ClassifyConfig(lr=5e-3, weight_decay=1e-6, batch_size=8, max_epochs=2 if augment else 6, patience=3, crop=32,
                         upsample=0, augment=augment, moco_aug=False, eval_batch_size=64, precision="fp32")  # fmt: skip
    trunk = resnet50_trunk()
    trunk.load_state_dict(state)
    seeds = [SEED, SEED + 1, SEED + 2]
    res = probe_over_seeds(trunk, data, cfg, "cpu", seeds, progress=False, return_head=True)
    path, head = _save(tmp_path, "cls_covidx", encoder, cfg, res, seeds, data.kind)
    assert head["probes.weight"].shape == (3, 3, 2048) and head["probes.bias"].shape == (3, 3)

    model = load_cell_model(path)
    _only_trained(path, model, "trunk.")
    assert not model.training and model.cell.meta["seeds"] == seeds and model.cell.meta["model"]["labels"] == [
        "normal", "pneumonia", "COVID-19"]  # fmt: skip
    logits = predict(model, images[data.test_rows])  # (P, n, K)
    np.testing.assert_allclose(logits, res["cases"].scores, rtol=1e-5, atol=1e-5)
    y = labels[data.test_rows]
    assert np.mean([accuracy(y, z) for z in logits]) == pytest.approx(res["acc"], abs=1e-12)
    # forward: the same logits from centre crops, as the evaluator's encoder path takes them
    crops = center_crop_normalize(torch.from_numpy(images[data.test_rows]), cfg.crop)
    np.testing.assert_allclose(model(crops).numpy(), logits, rtol=1e-5, atol=1e-5)


def test_seg_head_reproduces_the_test_dice(encoder, tmp_path):
    _, state, _ = encoder
    images, masks, _ = _squares(16, 32, seed=3)
    data = _task(images, np.arange(8), np.arange(8, 11), np.arange(11, 16), masks=masks)
    cfg = SegmentConfig(lr=5e-3, weight_decay=0.05, batch_size=4, max_epochs=3, patience=10, input_size=32,
                        augment=False, balance=False, eval_batch_size=8, precision="fp32",
                        decoder_channels=(16, 16, 8, 8, 8), prior=0.01)  # fmt: skip
    res = train_segmenter(state, data, cfg, "cpu", SEED, return_head=True)
    path, _ = _save(tmp_path, "seg_siim", encoder, cfg, res, [SEED])

    model = load_cell_model(path)
    _only_trained(path, model, "encoder.")
    assert model.cell.meta["model"]["decoder_channels"] == [16, 16, 8, 8, 8] and model.cell.meta["seed"] == SEED
    logits = predict(model, images[data.test_rows])
    assert logits.shape == (5, 32, 32)
    dice = dice_per_image(1 / (1 + np.exp(-logits)) > 0.5, masks[data.test_rows])
    np.testing.assert_array_equal(dice, res["cases"])
    assert dice.mean() == res["dice"]


def test_det_head_reproduces_the_test_detections(encoder, tmp_path):
    _, state, _ = encoder
    images, _, boxes = _squares(16, 64, seed=5)
    data = _task(images, np.arange(8), np.arange(8, 12), np.arange(12, 16), boxes=boxes)
    thresholds = (0.4, 0.5, 0.6)
    cfg = DetectConfig(lr=1e-3, weight_decay=1e-6, batch_size=4, max_epochs=2, patience=10, input_size=64,
                       conf_threshold=0.001, nms_iou=0.5, iou_thresholds=thresholds, drop_empty_test=False,
                       eval_batch_size=8, precision="fp32", widths=(8, 16, 32))  # fmt: skip
    res = train_detector(state, data, cfg, "cpu", SEED, return_head=True)
    path, _ = _save(tmp_path, "det_objcxr", encoder, cfg, res, [SEED])

    model = load_cell_model(path)
    _only_trained(path, model, "trunk.")
    assert model.cell.meta["model"]["neck_widths"] == [8, 16, 32] and len(model.cell.meta["model"]["anchors"]) == 9
    preds = predict(model, images[data.test_rows])
    scored, truths = res["cases"].per_image()
    assert sum(len(p) for p in scored) > 0  # the comparison is not of empty lists
    assert len(preds) == len(scored)
    for mine, theirs in zip(preds, scored):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-4)
    assert coco_map(preds, truths, thresholds) == pytest.approx(res["map"], abs=1e-12)


# ------------------------------------------------------------------------------------------ file and errors
@pytest.fixture(scope="module")
def cls_head(encoder, tmp_path_factory):
    """A small cls head file (a 2-probe binary cell on given features: no trunk pass)."""
    enc, _, sha = encoder
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 2048)).astype(np.float32)
    labels = (feats[:, 0] > 0).astype(np.float32)
    data = _task(np.zeros((20, 1, 1), np.uint8), np.arange(12), np.arange(12, 16), np.arange(16, 20),
                 labels=labels, kind="binary", dataset="rsna")  # fmt: skip
    cfg = ClassifyConfig(lr=5e-3, weight_decay=0.0, batch_size=4, max_epochs=2, patience=2, crop=32, upsample=0,
                         augment=False, moco_aug=False, eval_batch_size=64, precision="fp32")  # fmt: skip
    res = probe_over_seeds(None, data, cfg, "cpu", [SEED, SEED + 1], features=feats, progress=False, return_head=True)
    head = res["head"]
    meta = head_metadata(JOBS["cls_rsna"], 10, enc, sha, cfg, head, [SEED, SEED + 1], "binary")
    path = tmp_path_factory.mktemp("cls") / "models/finetune/cls_rsna-10-random/head.safetensors"
    save_head(path, head, meta)
    return path, head, meta


def test_the_same_head_gives_the_same_bytes_and_its_metadata_reads_back(cls_head, tmp_path):
    path, head, meta = cls_head
    again = tmp_path / "again.safetensors"
    save_head(again, {k: v.clone() for k, v in reversed(head.items())}, json.loads(json.dumps(meta)))
    assert again.read_bytes() == path.read_bytes()
    tensors, back = read_head(path)
    assert back == meta and set(tensors) == {"probes.weight", "probes.bias"}
    assert (back["job"], back["task"], back["pct"], back["seeds"]) == ("cls_rsna", "cls", 10, [SEED, SEED + 1])
    assert back["model"] == {"kind": "binary", "labels": ["target"], "probes": 2, "outputs": 1, "features": 2048}
    assert back["config"]["crop"] == 32 and back["config"]["mean"] == [0.5, 0.5, 0.5] and back["format_version"] == 1
    assert back["encoder"]["name"] == "random" and len(back["encoder"]["sha256"]) == 64


def test_a_missing_head_file_is_named(tmp_path):
    missing = tmp_path / "models/finetune/cls_rsna-1-random/head.safetensors"
    with pytest.raises(HeadError, match=re.escape(f"head file not found: {missing}")):
        load_cell_model(missing)


def test_a_missing_encoder_file_is_named(cls_head, tmp_path):
    path, _, _ = cls_head
    gone = tmp_path / "models/random/vision_encoder.safetensors"
    with pytest.raises(HeadError, match=re.escape(f"{path}: encoder weights file not found: {gone}")):
        load_cell_model(path, encoder_weights=gone)


def test_other_encoder_weights_are_refused_by_their_hash(cls_head, tmp_path):
    path, _, meta = cls_head
    other = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(other))
    with pytest.raises(HeadError, match=re.escape(f"{other} have SHA-256 {file_sha256(other)}, but the head was "
                                                  f"trained on {meta['encoder']['sha256']}")):  # fmt: skip
        load_cell_model(path, encoder_weights=other)


def test_an_unknown_format_version_and_a_file_without_head_metadata_are_refused(cls_head, tmp_path):
    path, head, meta = cls_head
    newer = tmp_path / "newer.safetensors"
    save_head(newer, head, {**meta, "format_version": 2})
    with pytest.raises(HeadError, match=re.escape(f"{newer}: head format version 2; this code reads version 1")):
        load_cell_model(newer)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(HeadError, match=re.escape(f"{plain}: not a fine-tune head file")):
        read_head(plain)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(HeadError, match=re.escape(f"{broken}: not a safetensors file")):
        read_head(broken)


def test_tensors_that_do_not_fit_the_described_model_are_refused(cls_head, encoder, tmp_path):
    path, head, meta = cls_head
    bad = tmp_path / "bad.safetensors"
    save_head(bad, {**head, "probes.extra": torch.zeros(1)}, meta)
    with pytest.raises(HeadError, match=r"do not fit .* 1 unexpected \['probes.extra'\]"):
        load_cell_model(bad, encoder_weights=encoder[0].path)

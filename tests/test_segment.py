"""The shared segmenter: metric and loss against hand formulas, smp's U-Net on the frozen trunk, balancing,
learning, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision

from mflag.finetune import segment
from mflag.finetune.checks import SubsetError, cell_record, check_subsets
from mflag.finetune.data import TaskData
from mflag.finetune.segment import SegmentConfig, dice_per_image, segmentation_loss, train_segmenter
from mflag.models import resnet50_trunk
from mflag.params import SegmentParams


def _cfg(**kw) -> SegmentConfig:
    base = dict(lr=5e-4, weight_decay=0.05, batch_size=4, max_epochs=2, patience=10, input_size=32,
                augment=True, balance=False, eval_batch_size=8, precision="fp32")
    return SegmentConfig(**{**base, **kw})


def _task(images, masks, train, valid, test, dataset: str = "siim") -> TaskData:
    return TaskData(dataset=dataset, images=images, index=pd.DataFrame(index=range(len(images))),
                    train_rows=np.asarray(train), valid_rows=np.asarray(valid), test_rows=np.asarray(test),
                    masks=masks)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trunk_state() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return {k: v.clone() for k, v in resnet50_trunk().state_dict().items()}


def _squares(n: int, size: int, seed: int, p_empty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Bright squares on a dark, noisy background; the mask is the square (some images empty)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        if rng.random() < p_empty:
            continue
        side = int(rng.integers(size // 4, size // 2 + 1))
        r, c = rng.integers(0, size - side + 1, size=2)
        masks[i, r : r + side, c : c + side] = 1
        images[i][masks[i] == 1] = rng.integers(200, 255, size=side * side)
    return images, masks


# ------------------------------------------------------------------------------------------ metric
def test_dice_per_image_hand_computed():
    pred = np.zeros((5, 4, 4), dtype=np.uint8)
    truth = np.zeros((5, 4, 4), dtype=np.uint8)
    pred[0, :2, :2] = 1  # |A| = 4
    truth[0, 1:3, 1:3] = 1  # |B| = 4, |A & B| = 1
    pred[1, :, :] = 1
    truth[1, :2, :] = 1  # |A| = 16, |B| = 8, overlap 8
    # 2: empty / empty; 3: empty truth, a prediction; 4: truth, empty prediction
    pred[3, 0, 0] = 1
    truth[4, 2, 2] = 1
    got = dice_per_image(pred, truth)
    expected = [2 * 1 / (4 + 4), 2 * 8 / (16 + 8), 1.0, 0.0, 0.0]
    np.testing.assert_allclose(got, expected)
    assert got.shape == (5,)
    np.testing.assert_allclose(dice_per_image(pred.astype(bool), truth.astype(bool)), expected)


# -------------------------------------------------------------------------------------------- loss
def test_segmentation_loss_matches_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) * 3
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).double()
    focal = torchvision.ops.sigmoid_focal_loss(logits, target, alpha=-1, gamma=2, reduction="mean")
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    expected = 10 * focal - torch.log(dice)
    torch.testing.assert_close(segment.focal_loss(logits, target), focal.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(segment.soft_dice(logits, target), dice.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(segmentation_loss(logits, target), expected.float(), rtol=1e-5, atol=1e-6)
    # Extreme logits stay finite; the gradient agrees with the reference formula's.
    big = torch.tensor([[[[60.0, -60.0], [60.0, -60.0]]]], requires_grad=True)
    tgt = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    assert torch.isfinite(segmentation_loss(big, tgt))
    x = logits.clone().requires_grad_(True)
    segmentation_loss(x, target).backward()
    y = logits.clone().requires_grad_(True)
    py = torch.sigmoid(y)
    ref = 10 * torchvision.ops.sigmoid_focal_loss(y, target, alpha=-1, gamma=2, reduction="mean") - torch.log(
        (2 * (py * target).sum() + 1) / (py.sum() + target.sum() + 1)
    )
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------- model
def test_build_unet_loads_and_rejects(trunk_state):
    with_fc = {**trunk_state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}  # ignored
    model = segment.build_unet(with_fc)
    assert isinstance(model, smp.Unet)
    assert "fc.weight" in with_fc  # the caller's dict is not mutated (smp's loader pops fc keys)
    enc = model.encoder.state_dict()
    assert set(enc) == set(trunk_state)
    assert all(torch.equal(enc[k], trunk_state[k]) for k in enc)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in model.segmentation_head.parameters())
    assert not model.encoder.training and not any(m.training for m in model.encoder.modules())
    model.train()
    assert not model.encoder.training and model.decoder.training and model.segmentation_head.training
    assert not any(m.training for m in model.encoder.modules())
    bad = {k: v for k, v in trunk_state.items() if k != "layer1.0.conv1.weight"}
    bad["layer4.0.bn1.weight"] = torch.zeros(3)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing.*layer1\.0\.conv1\.weight.*1 unexpected.*extra.*1 with another shape"):
        segment.build_unet(bad)


def test_encoder_computes_the_trunk(trunk_state):
    """The names map to the same network: smp's deepest level, pooled, is the trunk's (B, 2048) output."""
    model = segment.build_unet(trunk_state, (32, 16, 16, 8, 8))
    trunk = resnet50_trunk()
    trunk.load_state_dict(trunk_state)
    trunk.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        levels = model.encoder(x)
        want = trunk(x)
    assert [tuple(f.shape[1:]) for f in levels] == [(3, 64, 64), (64, 32, 32), (256, 16, 16), (512, 8, 8),
                                                    (1024, 4, 4), (2048, 2, 2)]  # fmt: skip
    torch.testing.assert_close(levels[-1].mean((2, 3)), want, rtol=1e-5, atol=1e-5)


def test_decoder_init_comes_from_the_seed(trunk_state):
    def decoder_after(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = segment.build_unet(trunk_state, (32, 16, 16, 8, 8))
        return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}

    a, b, c = decoder_after(0), decoder_after(0), decoder_after(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.blocks.0.conv1.0.weight"], c["decoder.blocks.0.conv1.0.weight"])
    assert torch.equal(a["segmentation_head.0.bias"], torch.zeros(1))  # smp's head init: Xavier, zero bias


@pytest.mark.parametrize("precision,augment", [("fp32", True), ("bf16", True), ("fp32", False)])
def test_encoder_frozen_through_training(trunk_state, monkeypatch, precision, augment):
    built = []
    real = segment.build_unet

    def capture(state, *args):
        model = real(state, *args)
        built.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(segment, "build_unet", capture)
    images, masks = _squares(8, 32, seed=1)
    before = {k: v.clone() for k, v in trunk_state.items()}
    out = train_segmenter(trunk_state, _task(images, masks, np.arange(4), np.arange(4, 6), np.arange(6, 8)),
                          _cfg(max_epochs=2, precision=precision, augment=augment), "cpu", seed=0)
    assert out["epochs_run"] == 2 and out["best_epoch"] in (1, 2) and out["n_train"] == 4
    (model, init), = built
    final = model.state_dict()
    enc_keys = [k for k in final if k.startswith("encoder.")]
    assert len(enc_keys) == len(trunk_state)
    for k in enc_keys:  # weights and batch-norm statistics, bit for bit
        name = k[len("encoder."):]
        assert torch.equal(final[k], init[k]), k
        assert torch.equal(final[k], before[name]), k
    assert all(torch.equal(trunk_state[k], before[k]) for k in before)  # the input is not mutated
    dec_keys = [k for k in final if k.startswith(("decoder.", "segmentation_head.")) and final[k].is_floating_point()]
    assert any(not torch.equal(final[k], init[k]) for k in dec_keys)
    assert not torch.equal(final["segmentation_head.0.weight"], init["segmentation_head.0.weight"])


def test_balancing_keeps_every_positive(trunk_state, monkeypatch):
    images, masks = _squares(17, 32, seed=2)
    masks[3:13] = 0  # train rows 0..12: positives 0, 1, 2 and ten negatives
    rows = segment.balanced_rows(np.arange(13), masks, np.random.default_rng(0))
    assert len(rows) == 6 and {0, 1, 2} <= set(rows.tolist())
    assert len(set(rows.tolist())) == 6
    out = train_segmenter(trunk_state, _task(images, masks, np.arange(13), np.arange(13, 15), np.arange(15, 17)),
                          _cfg(max_epochs=1, balance=True), "cpu", seed=3)
    assert out["n_train"] == 6


# ---------------------------------------------------------------------------------------- augment
def test_shift_scale_rotate_warps_image_and_mask_alike():
    images, masks = _squares(16, 32, seed=4)
    x = torch.from_numpy(images)[:, None].float()
    m = torch.from_numpy(masks)[:, None].float()
    gen = torch.Generator().manual_seed(0)
    xa, ma = segment.shift_scale_rotate(x, m, segment.MGCA_SSR, gen)
    assert set(ma.unique().tolist()) <= {0.0, 1.0}
    same = [torch.equal(xa[i], x[i]) and torch.equal(ma[i], m[i]) for i in range(16)]
    assert 0 < sum(same) < 16  # p = 0.5
    # the square moves with its mask: bright pixels are (mostly) the mask's pixels
    bright = xa > 120
    agree = (bright == (ma > 0)).float().mean()
    assert agree > 0.97
    # identical generator state -> identical warp
    xb, mb = segment.shift_scale_rotate(x, m, segment.MGCA_SSR, torch.Generator().manual_seed(0))
    assert torch.equal(xa, xb) and torch.equal(ma, mb)


# ---------------------------------------------------------------------------------------- learning
def _without_timing(logs: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "train_images_per_second")} for row in logs]


def test_early_stopping_tests_the_best_epoch(trunk_state, monkeypatch):
    """Scripted validation losses: best at epoch 2, patience 3 -> 5 epochs run, epoch 2's decoder tested."""
    scripted = iter([3.0, 2.0, 2.5, 2.1, 2.2, 1.0])
    real_loss = segment.segmentation_loss

    def loss(logits, target):
        if torch.is_grad_enabled():
            return real_loss(logits, target)
        return torch.tensor(next(scripted))  # one validation batch per epoch

    built, snapshots = [], {}
    real_build = segment.build_unet
    monkeypatch.setattr(segment, "build_unet", lambda state, *a: built.append(real_build(state, *a)) or built[-1])
    monkeypatch.setattr(segment, "segmentation_loss", loss)

    def log(row):
        snapshots[row["epoch"]] = {k: v.clone() for k, v in built[0].decoder.state_dict().items()}

    images, masks = _squares(8, 32, seed=6)
    out = train_segmenter(trunk_state, _task(images, masks, np.arange(4), np.arange(4, 6), np.arange(6, 8)),
                          _cfg(max_epochs=6, patience=3, augment=False, lr=1e-2), "cpu", seed=0, log=log)
    assert out["epochs_run"] == 5 and out["best_epoch"] == 2
    final = built[0].decoder.state_dict()
    assert all(torch.equal(final[k], snapshots[2][k]) for k in final)
    assert any(not torch.equal(final[k], snapshots[5][k]) for k in final)


def test_toy_squares_learnable(trunk_state):
    images, masks = _squares(28, 32, seed=5, p_empty=0.1)
    data = _task(images, masks, np.arange(16), np.arange(16, 20), np.arange(20, 28))
    logs = []
    cfg = _cfg(lr=3e-3, weight_decay=0.0, batch_size=4, max_epochs=6, augment=False)
    untrained = train_segmenter(trunk_state, data, _cfg(max_epochs=1, lr=0.0), "cpu", seed=0)
    out = train_segmenter(trunk_state, data, cfg, "cpu", seed=0, log=logs.append)
    # one record per epoch, in order (the stage prints each as progress)
    assert [row["epoch"] for row in logs] == list(range(1, out["epochs_run"] + 1))
    assert out["dice"] > 0.5 and out["dice"] > untrained["dice"] + 0.2, (out, untrained)
    assert logs[-1]["train_loss"] < logs[0]["train_loss"]
    assert out["best_epoch"] == 1 + int(np.argmin([row["valid_loss"] for row in logs]))


def test_same_seed_same_result(trunk_state):
    images, masks = _squares(12, 32, seed=7, p_empty=0.5)
    args = (trunk_state, _task(images, masks, np.arange(8), np.arange(8, 10), np.arange(10, 12)))
    cfg = _cfg(max_epochs=2, batch_size=2, augment=True, balance=True)
    runs = []
    cases = []
    for seed in (0, 0, 1):
        logs = []
        out = train_segmenter(*args, cfg, "cpu", seed=seed, log=logs.append)
        cases.append(out.pop("cases"))  # an array: compared on its own
        runs.append((out, _without_timing(logs)))
    assert runs[0] == runs[1] and np.array_equal(cases[0], cases[1])
    assert runs[0][1] != runs[2][1]


def test_stored_encoder_features_give_the_full_forward(trunk_state):
    """Without augmentation the decoder runs on features encoded once; they must give model(x) exactly."""
    model = segment.build_unet(trunk_state, (32, 16, 16, 8, 8))
    model.eval()
    images, masks = _squares(6, 40, seed=9)
    cfg = _cfg(input_size=32, eval_batch_size=4, augment=False, decoder_channels=(32, 16, 16, 8, 8))
    feats, m = segment._encode(model, torch.from_numpy(images), torch.from_numpy(masks), cfg, channels_last=False)
    assert feats[0].shape == (6, 0, 32, 32) and m.shape == (6, 1, 32, 32)
    # reference: resize and normalise written out here, then smp's own forward
    x = torch.nn.functional.interpolate(torch.from_numpy(images)[:, None].float(), size=(32, 32), mode="bilinear",
                                        align_corners=False)  # fmt: skip
    x = ((x - 127.5) / 127.5).repeat(1, 3, 1, 1)
    with torch.no_grad():
        want = model(x)
        got = model.segmentation_head(model.decoder(feats))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    want_m = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=(32, 32), mode="nearest")
    assert torch.equal(m, want_m)


def test_decoder_channels_are_used(trunk_state):
    model = segment.build_unet(trunk_state, (64, 32, 16, 16, 8))
    assert model.segmentation_head[0].in_channels == 8
    assert model.decoder.blocks[0].conv1[0].out_channels == 64
    with pytest.raises(ValueError, match="decoder_channels"):
        _cfg(decoder_channels=(64, 32))
    with pytest.raises(ValueError, match="multiple of 32"):  # smp's Unet does not check its input's sides
        _cfg(input_size=48)


def _seg_params(**kw) -> SegmentParams:
    base = dict(lr=5e-4, weight_decay=0.05, batch_size={"siim": 8, "rsna": 16}, max_epochs=50, patience=10,
                input_size=224, augment=True, balance=True, decoder_channels=[256, 128, 64, 32, 16],
                min_epoch_images=0, prior=None, eval_batch_size=64)  # fmt: skip
    return SegmentParams(**{**base, **kw})


def test_config_from_params():
    c = _seg_params()
    siim = SegmentConfig.from_params(c, "siim", 1, "bf16")
    assert siim == SegmentConfig(lr=5e-4, weight_decay=0.05, batch_size=8, max_epochs=50, patience=10, input_size=224,
                                 augment=True, balance=True, eval_batch_size=64, precision="bf16",
                                 decoder_channels=(256, 128, 64, 32, 16))  # fmt: skip
    assert SegmentConfig.from_params(c, "siim", 100, "bf16") == siim  # the same at every fraction
    assert SegmentConfig.from_params(_seg_params(min_epoch_images=512), "siim", 1, "bf16").min_epoch_images == 512
    assert SegmentConfig.from_params(_seg_params(prior=0.01), "siim", 1, "bf16").prior == 0.01
    rsna = SegmentConfig.from_params(c, "rsna", 10, "fp32")
    assert rsna.batch_size == 16 and not rsna.balance and rsna.precision == "fp32"  # only SIIM is balanced
    assert not SegmentConfig.from_params(_seg_params(balance=False), "siim", 1, "fp32").balance
    with pytest.raises(ValueError, match="batch_size has no entry for 'covidx'"):
        SegmentConfig.from_params(c, "covidx", 1, "fp32")


def test_task_without_masks_is_refused(trunk_state):
    images, masks = _squares(6, 32, seed=0)
    data = _task(images, masks, np.arange(2), np.arange(2, 4), np.arange(4, 6))
    data.masks = None
    with pytest.raises(ValueError, match="no masks"):
        train_segmenter(trunk_state, data, _cfg(max_epochs=1), "cpu", seed=0)


# ------------------------------------------------------------------------- subsets without a positive mask
def test_a_test_subset_without_a_positive_mask_is_scored(trunk_state):
    """Dice is defined on a test subset whose masks are all empty: the protocol scores an empty truth 1 for an
    empty prediction and 0 otherwise (dice_per_image), so the cell runs, writes a number and warns that the
    score only says whether the predictions are empty. Only a train subset without a positive mask stops."""
    images, masks = _squares(14, 32, seed=3, p_empty=0.3)
    masks[10:] = 0
    data = _task(images, masks, np.arange(8), np.arange(8, 10), np.arange(10, 14))
    check = check_subsets(data, "seg", 1)
    assert check.not_evaluable is None
    assert check.warnings == ["the test subset (4 rows) has no positive mask: Dice only scores whether the "
                              "predictions are empty"]  # fmt: skip
    out = train_segmenter(trunk_state, data, _cfg(max_epochs=1, augment=False), "cpu", seed=0)
    record = cell_record(out, "dice", check.not_evaluable)
    assert "not_evaluable" not in record and 0.0 <= record["dice"] <= 1.0
    assert record["dice"] in {k / 4 for k in range(5)}  # each of the 4 images scores exactly 0 or 1


def test_a_train_subset_without_a_positive_mask_stops_the_cell():
    images, masks = _squares(14, 32, seed=3)
    masks[:8] = 0
    with pytest.raises(SubsetError, match=r"the train subset at 10% \(8 rows\) has no positive mask: nothing can be "
                                          r"learned from it; see data/splits/siim.csv"):  # fmt: skip
        check_subsets(_task(images, masks, np.arange(8), np.arange(8, 10), np.arange(10, 14)), "seg", 10)
    images, masks = _squares(14, 32, seed=3)
    masks[8:10] = 0  # a valid subset without a positive mask: the validation loss is still defined, a warning
    check = check_subsets(_task(images, masks, np.arange(8), np.arange(8, 10), np.arange(10, 14)), "seg", 10)
    assert check.not_evaluable is None
    assert check.warnings[0].startswith("the valid subset (2 rows) has no positive mask")


# ------------------------------------------------------------------------- the encoder's normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _by_hand(images_u8: np.ndarray, mean, std) -> np.ndarray:
    """Grey in [0, 1], 3 channels, (x - mean_c) / std_c, float64 (images already at the input size)."""
    v = images_u8.astype(np.float64)[:, None] / 255.0
    return (v - np.asarray(mean)[None, :, None, None]) / np.asarray(std)[None, :, None, None]


def _recording(monkeypatch) -> list[torch.Tensor]:
    """Every input batch of the U-Net's encoder in the next train_segmenter run."""
    inputs: list[torch.Tensor] = []
    real = segment.build_unet

    def build(state, *args):
        model = real(state, *args)
        model.encoder.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().float().clone()))
        return model

    monkeypatch.setattr(segment, "build_unet", build)
    return inputs


@pytest.mark.parametrize("augment", [False, True])
def test_the_encoders_mean_and_std_reach_its_input(trunk_state, monkeypatch, augment):
    images, masks = _squares(12, 32, seed=8)
    rows = (np.array([5, 1, 7, 3]), np.array([8, 0]), np.array([11, 2, 9]))
    inputs = _recording(monkeypatch)
    cfg = _cfg(max_epochs=1, augment=augment, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train_segmenter(trunk_state, _task(images, masks, *rows), cfg, "cpu", seed=0)
    if augment:  # training batches are warped; the test images, predicted last, are not
        got, want = inputs[-1], _by_hand(images[rows[2]], IMAGENET_MEAN, IMAGENET_STD)
    else:  # encoded once: train, valid, test
        got, want = torch.cat(inputs), _by_hand(images[np.concatenate(rows)], IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6)


def test_default_normalisation_is_the_historical_one():
    x = torch.from_numpy(_squares(3, 32, seed=1)[0])[:, None].float()
    got = segment._normalise(x, _cfg(), channels_last=False)
    assert torch.equal(got, (x / 127.5 - 1.0).expand(-1, 3, -1, -1))  # bit for bit: results unchanged
    other = segment._normalise(x, _cfg(mean=IMAGENET_MEAN, std=IMAGENET_STD), channels_last=True)
    np.testing.assert_allclose(other.numpy(), _by_hand(x[:, 0].numpy().astype(np.uint8), IMAGENET_MEAN, IMAGENET_STD),
                               rtol=0, atol=2e-6)  # fmt: skip


# ---------------------------------------------------------------------------------- bootstrap evidence
def test_dice_cases_are_the_test_images_dice_in_test_row_order(trunk_state):
    from mflag.stats import replicates, resample_indices

    images, masks = _squares(14, 32, seed=5, p_empty=0.3)
    test = np.array([8, 13, 9, 12, 10, 11])
    cfg = _cfg(max_epochs=2, augment=False, lr=3e-3)
    out = train_segmenter(trunk_state, _task(images, masks, np.arange(6), np.arange(6, 8), test), cfg, "cpu", seed=0)
    cases = out["cases"]
    assert isinstance(cases, np.ndarray) and cases.shape == (6,) and cases.dtype == np.float64
    assert ((cases >= 0) & (cases <= 1)).all() and len(np.unique(cases)) > 2  # images differ: the order shows
    assert replicates(cases, np.arange(6)[None])[0] == pytest.approx(out["dice"], abs=1e-15)
    idx = resample_indices(6, 50, 42, "seg_siim")
    np.testing.assert_allclose(replicates(cases, idx), [np.mean(cases[r]) for r in idx], rtol=0, atol=1e-15)
    # the same run with the test rows reversed: the same per-image Dice, reversed (the decoder is in eval mode,
    # so an image's prediction does not depend on its batch)
    again = train_segmenter(trunk_state, _task(images, masks, np.arange(6), np.arange(6, 8), test[::-1]), cfg, "cpu",
                            seed=0)  # fmt: skip
    np.testing.assert_array_equal(again["cases"], cases[::-1])


def _counted_steps(monkeypatch) -> list[int]:
    """Counts the AdamW steps taken (the optimiser itself runs as usual)."""
    calls: list[int] = []
    real = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


@pytest.mark.parametrize("min_images, steps", [(0, 2), (4, 2), (5, 4), (10, 6)])
def test_a_small_training_subset_is_cycled_to_min_epoch_images(trunk_state, monkeypatch, min_images, steps):
    """4 training images, batch 2: one pass is 2 steps; at least 5 images need 2 passes (4 steps), 10 need 3."""
    calls = _counted_steps(monkeypatch)
    images, masks = _squares(8, 32, seed=6)
    train_segmenter(trunk_state, _task(images, masks, np.arange(4), np.arange(4, 6), np.arange(6, 8)),
                    _cfg(max_epochs=1, batch_size=2, augment=False, min_epoch_images=min_images), "cpu", seed=0)
    assert len(calls) == steps


def test_the_prior_sets_only_the_heads_bias_to_its_logit(trunk_state):
    """With a prior p the head's bias is logit(p) (scipy's expit of it gives p back); every other weight is
    the one the same seed draws without it."""
    from scipy.special import expit

    models = {}
    for prior in (None, 0.01):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            models[prior] = segment.build_unet(trunk_state, (32, 16, 16, 8, 8), prior)
    bias = models[0.01].segmentation_head[0].bias.detach().numpy()
    np.testing.assert_allclose(expit(bias.astype(np.float64)), 0.01, rtol=1e-6)
    plain, primed = models[None].state_dict(), models[0.01].state_dict()
    differing = [k for k in plain if not torch.equal(plain[k], primed[k])]
    assert differing == ["segmentation_head.0.bias"]
    with pytest.raises(ValueError, match="prior must be in"):
        _cfg(prior=1.0)

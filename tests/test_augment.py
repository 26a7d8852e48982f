"""Batched on-device augmentation vs an independent per-sample reference (torchvision.transforms.v2.functional)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomPerspective
from torchvision.transforms.v2 import functional as F

from mflag.augment import (
    AugmentSpec,
    apply_params,
    augment_batch,
    center_crop_normalize,
    reference_pil_transform,
    sample_params,
)

S, C = 64, 48  # input side, crop side: small enough for a fast suite
BILINEAR = InterpolationMode.BILINEAR


def spec(**kw) -> AugmentSpec:
    base = dict(crop=C, rotation=(0.0, 90.0), perspective_p=0.5, perspective_distortion=0.5, autocontrast_p=0.5)
    base.update(kw)
    return AugmentSpec(**base)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_images(b: int, side: int = S, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, side, side), generator=gen(seed), dtype=torch.uint8)


def smooth_images(b: int, side: int = S, seed: int = 0) -> torch.Tensor:
    """Low-frequency grey images (X-ray-like content) with a little noise."""
    g = gen(seed)
    z = torch.randn(b, 1, 8, 8, generator=g)
    x = nnf.interpolate(z, size=(side, side), mode="bicubic", align_corners=False)[:, 0] * 50 + 128
    x = x + torch.randn(b, side, side, generator=g) * 2
    return x.clamp(0, 255).round().to(torch.uint8)


def levels(out: torch.Tensor) -> torch.Tensor:
    """Normalised output -> grey levels (float, [0, 255])."""
    return (out + 1.0) * 127.5


def fixed_params(b: int, **override) -> dict[str, torch.Tensor]:
    p = sample_params(b, S, spec(), gen(123))
    p["angle"] = torch.zeros(b, dtype=torch.float64)
    p["perspective"] = torch.zeros(b, dtype=torch.bool)
    p["autocontrast"] = torch.zeros(b, dtype=torch.bool)
    p.update(override)
    return p


def crop_of(x: torch.Tensor, p: dict, i: int) -> torch.Tensor:
    return F.crop(x[i : i + 1], int(p["top"][i]), int(p["left"][i]), C, C)  # (1, C, C) uint8


def corners(p: dict, i: int) -> tuple[list[list[int]], list[list[int]]]:
    return p["startpoints"][i].long().tolist(), p["endpoints"][i].long().tolist()


# ------------------------------------------------------------------------------- against torchvision
def test_crop_only_matches_f_crop():
    x = noise_images(6)
    sp = spec(rotation=(0.0, 0.0), perspective_p=0.0, autocontrast_p=0.0)
    out = augment_batch(x, sp, gen(5))
    p = sample_params(6, S, sp, gen(5))  # the same generator state -> the parameters augment_batch used
    assert len({(int(t), int(l)) for t, l in zip(p["top"], p["left"])}) > 1
    for i in range(6):
        ref = crop_of(x, p, i).float() / 255 * 2 - 1
        torch.testing.assert_close(out[i], ref.expand(3, C, C), atol=1e-5, rtol=0)


def test_crop_only_non_square_input():
    x = torch.randint(0, 256, (5, 70, 60), generator=gen(6), dtype=torch.uint8)
    sp = spec(rotation=(0.0, 0.0), perspective_p=0.0, autocontrast_p=0.0, channels=1)
    out = augment_batch(x, sp, gen(1))
    p = sample_params(5, (70, 60), sp, gen(1))
    assert int(p["top"].max()) <= 70 - C and int(p["left"].max()) <= 60 - C
    for i in range(5):
        ref = crop_of(x, p, i).float() / 255 * 2 - 1
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("angle", [0.0, 17.0, 45.0, 73.5, 90.0, -30.0])
def test_rotation_matches_f_rotate(angle):
    # Rotation of the *cropped* image with zero fill: the crop's zero padding is exact, so only
    # torchvision's rounding to uint8 (<= 0.5 level) separates the two.
    x = noise_images(4, seed=1)
    p = fixed_params(4, angle=torch.full((4,), angle, dtype=torch.float64))
    out = levels(apply_params(x, p, spec(channels=1)))
    for i in range(4):
        ref = F.rotate(crop_of(x, p, i), angle, interpolation=BILINEAR).float()
        diff = (out[i] - ref).abs()
        assert diff.max() <= 1.0, (angle, diff.max())
        assert diff.mean() < 0.5


def test_rotation_is_counter_clockwise():
    x = torch.zeros(1, S, S, dtype=torch.uint8)
    p = fixed_params(1, top=torch.tensor([8]), left=torch.tensor([8]), angle=torch.tensor([90.0], dtype=torch.float64))
    x[0, 8 : 8 + C, 8 + C - 4 : 8 + C] = 255  # bright stripe on the crop's right edge
    out = levels(apply_params(x, p, spec(channels=1)))[0, 0]
    assert out[:4].mean() > 250 and out[4:].max() < 1  # turned counter-clockwise: now along the top


def test_perspective_matches_f_perspective_fixed_points():
    x = noise_images(2, seed=2)
    start = [[0, 0], [C - 1, 0], [C - 1, C - 1], [0, C - 1]]
    end = [[5, 3], [40, 9], [44, 45], [2, 38]]
    p = fixed_params(
        2,
        perspective=torch.ones(2, dtype=torch.bool),
        startpoints=torch.tensor([start] * 2, dtype=torch.float64),
        endpoints=torch.tensor([end] * 2, dtype=torch.float64),
    )
    out = levels(apply_params(x, p, spec(channels=1)))
    for i in range(2):
        ref = F.perspective(crop_of(x, p, i), start, end, interpolation=BILINEAR).float()
        diff = (out[i] - ref).abs()
        assert diff.max() <= 1.0 and diff.mean() < 0.5


def test_perspective_matches_f_perspective_sampled_points():
    x = noise_images(4, seed=3)
    p = sample_params(4, S, spec(), gen(7))
    p.update(angle=torch.zeros(4, dtype=torch.float64), perspective=torch.ones(4, dtype=torch.bool))
    p["autocontrast"][:] = False
    out = levels(apply_params(x, p, spec(channels=1)))
    for i in range(4):
        start, end = corners(p, i)
        ref = F.perspective(crop_of(x, p, i), start, end, interpolation=BILINEAR).float()
        assert (out[i] - ref).abs().max() <= 1.0


def test_rotation_then_perspective_matches_sequential_reference():
    # One interpolation of the composed homography vs two rounds of bilinear resampling: differences are
    # sub-pixel blur in the interior and the soft 1-pixel borders of the zero-filled regions.
    x = smooth_images(4, seed=4)
    p = sample_params(4, S, spec(), gen(11))
    p.update(
        angle=torch.tensor([10.0, 33.0, 61.0, 84.0], dtype=torch.float64),
        perspective=torch.ones(4, dtype=torch.bool),
        autocontrast=torch.zeros(4, dtype=torch.bool),
    )
    out = levels(apply_params(x, p, spec(channels=1)))
    for i in range(4):
        start, end = corners(p, i)
        angle = float(p["angle"][i])

        def sequential(img):
            return F.perspective(F.rotate(img, angle, interpolation=BILINEAR), start, end, interpolation=BILINEAR)

        ref = sequential(crop_of(x, p, i)).float()
        # Interior: pixels whose 5x5 neighbourhood is fully inside the valid (non-filled) region.
        support = sequential(torch.full((1, C, C), 255, dtype=torch.uint8)).float() == 255
        interior = -nnf.max_pool2d(-support.float()[None], 5, stride=1, padding=2)[0] > 0.5
        diff = (out[i] - ref).abs()
        assert diff.mean() < 2.0, diff.mean()
        assert (diff[interior] <= 3).float().mean() > 0.99
        assert interior.float().mean() > 0.15  # the check is not vacuous


def test_autocontrast_matches_f_autocontrast():
    x = smooth_images(5, seed=5)
    x[3] = 77  # flat image: left unchanged
    p = fixed_params(5, autocontrast=torch.ones(5, dtype=torch.bool))
    out = levels(apply_params(x, p, spec(channels=1)))
    for i in range(5):
        ref = F.autocontrast(crop_of(x, p, i)).float()
        assert (out[i] - ref).abs().max() <= 1.0
    assert torch.allclose(out[3], torch.full_like(out[3], 77.0), atol=1e-3)
    assert out[0].min() < 1e-3 and out[0].max() > 255 - 1e-3


def test_autocontrast_after_geometry_stretches_to_full_range():
    x = smooth_images(4, seed=6) // 2 + 40  # low contrast: levels 40..167
    p = sample_params(4, S, spec(), gen(3))
    p["autocontrast"] = torch.tensor([True, False, True, False])
    out = apply_params(x, p, spec())
    for i in (0, 2):
        assert out[i].min() == pytest.approx(-1.0, abs=1e-5) and out[i].max() == pytest.approx(1.0, abs=1e-5)
    assert out[1].max() < 0.4 and out[3].max() < 0.4


def test_center_crop_normalize_matches_f_center_crop():
    for side in (64, 65):  # even and odd margins (torchvision rounds the offset half to even)
        x = noise_images(3, side=side, seed=side)
        out = center_crop_normalize(x, C)
        assert out.shape == (3, 3, C, C) and out.dtype == torch.float32
        ref = F.center_crop(x[:, None], [C, C]).float() / 255 * 2 - 1
        torch.testing.assert_close(out, ref.expand(3, 3, C, C), atol=1e-6, rtol=0)
        torch.testing.assert_close(center_crop_normalize(x[:, None], C, channels=1), ref, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------- randomness and contracts
def test_determinism_and_seed_sensitivity():
    x = smooth_images(8, seed=7)
    a = augment_batch(x, spec(), gen(42))
    b = augment_batch(x, spec(), gen(42))
    c = augment_batch(x, spec(), gen(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_untouched():
    state = torch.get_rng_state()
    augment_batch(smooth_images(4), spec(), gen(0))
    assert torch.equal(state, torch.get_rng_state())


def test_shape_dtype_range_and_layouts():
    x = smooth_images(5, seed=8)
    out = augment_batch(x, spec(), gen(1))
    assert out.shape == (5, 3, C, C) and out.dtype == torch.float32 and out.device == x.device
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert torch.equal(out, augment_batch(x[:, None], spec(), gen(1)))
    one = augment_batch(x, spec(channels=1), gen(1))
    assert one.shape == (5, 1, C, C) and torch.equal(one[:, 0], out[:, 0])
    assert augment_batch(x[:0], spec(), gen(1)).shape == (0, 3, C, C)


def test_input_validation():
    with pytest.raises(TypeError):
        augment_batch(torch.zeros(2, S, S), spec(), gen(0))
    with pytest.raises(ValueError):
        augment_batch(torch.zeros(2, 3, S, S, dtype=torch.uint8), spec(), gen(0))
    with pytest.raises(ValueError):
        augment_batch(torch.zeros(2, 40, 40, dtype=torch.uint8), spec(), gen(0))
    with pytest.raises(ValueError):
        spec(perspective_p=1.5)


def test_per_sample_parameters_differ():
    x = torch.stack([smooth_images(1, seed=9)[0]] * 8)  # identical inputs
    out = augment_batch(x, spec(), gen(2))
    assert len({o.numpy().tobytes() for o in out}) == 8
    p = sample_params(8, S, spec(), gen(2))
    assert len(set(p["angle"].tolist())) == 8
    assert len(set(zip(p["top"].tolist(), p["left"].tolist()))) > 4
    assert len({e.numpy().tobytes() for e in p["endpoints"]}) > 4


def test_parameter_distribution():
    n = 20000
    sp = spec()
    p = sample_params(n, S, sp, gen(99))
    assert abs(p["perspective"].float().mean().item() - 0.5) < 0.02
    assert abs(p["autocontrast"].float().mean().item() - 0.5) < 0.02
    assert p["angle"].min() >= 0 and p["angle"].max() <= 90
    counts = torch.histc(p["angle"].float(), bins=9, min=0, max=90)
    assert (counts / n - 1 / 9).abs().max() < 0.015  # uniform over the range
    for key in ("top", "left"):  # uniform integers over [0, S - C] like RandomCrop
        assert torch.equal(torch.unique(p[key]), torch.arange(S - C + 1))
    # Corner supports equal RandomPerspective.get_params', drawn over many calls (global RNG, seeded here).
    torch.manual_seed(0)
    tv = torch.tensor([RandomPerspective.get_params(C, C, 0.5)[1] for _ in range(3000)], dtype=torch.float64)
    for k in range(4):
        for d in range(2):
            ours = set(torch.unique(p["endpoints"][:, k, d]).tolist())
            assert ours == set(torch.unique(tv[:, k, d]).tolist()), (k, d)
    assert torch.equal(p["startpoints"][0], torch.tensor([[0, 0], [C - 1, 0], [C - 1, C - 1], [0, C - 1]]).double())
    never = sample_params(500, S, spec(perspective_p=0.0, autocontrast_p=0.0), gen(1))
    always = sample_params(500, S, spec(perspective_p=1.0, autocontrast_p=1.0), gen(1))
    assert not never["perspective"].any() and not never["autocontrast"].any()
    assert always["perspective"].all() and always["autocontrast"].all()


def test_reference_pil_transform_runs():
    img = Image.fromarray(smooth_images(1, seed=10)[0].numpy(), mode="L")
    torch.manual_seed(0)
    out = reference_pil_transform(spec())(img)
    assert out.shape == (3, C, C) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert np.allclose(out[0].numpy(), out[1].numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = smooth_images(16, seed=12)
    cpu = augment_batch(x, spec(), gen(5))
    gpu = augment_batch(x.cuda(), spec(), gen(5))
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 2e-3

"""Batched, on-device image augmentation reproducing the M-FLAG reference pipeline.

The reference code augments each image with PIL inside DataLoader workers::

    RandomCrop(224), RandomRotation((0, 90)), RandomGrayscale(0.5),
    RandomPerspective(0.5, p=0.5, interpolation=BICUBIC), RandomAutocontrast(0.5),
    ToTensor(), Normalize(0.5, 0.5)

on RGB copies of grey images (``RandomGrayscale`` is then a no-op). This module draws the same
per-sample parameters for a whole batch of uint8 images and applies them on the training device:

* crop, rotation and perspective are composed into one output->input homography per sample; all
  sampling grids are built at once and ``torch.nn.functional.grid_sample`` is called once per batch
  (bilinear, zero padding, ``align_corners=False``). Only ``crop x crop`` output pixels are computed.
* the crop's zero padding (what the rotation of the *cropped* image sees outside it) is exact: each
  sample's input is zeroed outside its own crop window before sampling, so bilinear taps that fall
  outside the window read 0 exactly as ``F.rotate`` on the cropped image does.
* the perspective's zero padding outside the *rotated* image is emulated by the analytic bilinear
  border weight of that image's frame (what sampling a zero-padded all-ones image would give).
* autocontrast is a per-image affine rescale (min -> 0, max -> 255), then ``x / 127.5 - 1``.

Coordinates follow torchvision's grid conventions: "edge" pixel coordinates where pixel ``j`` covers
``[j, j + 1)`` and its centre is ``j + 0.5``; perspective coefficients are the ones
``torchvision.transforms.functional._get_perspective_coeffs`` solves (endpoints -> startpoints), applied
to those coordinates; positive rotation angles turn the image counter-clockwise.

Known deviations from the reference (documented, by design): one bilinear interpolation instead of a
nearest-neighbour rotation (torchvision's ``RandomRotation`` default) followed by a bicubic perspective,
and no uint8 rounding between stages. Both only change sub-pixel detail, not the distribution of
geometric / photometric parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

__all__ = [
    "AugmentSpec",
    "augment_batch",
    "sample_params",
    "apply_params",
    "perspective_matrices",
    "rotation_matrices",
    "center_crop_normalize",
    "reference_pil_transform",
]


@dataclass(frozen=True)
class AugmentSpec:
    crop: int  # output side (random crop of this size from the input)
    rotation: tuple[float, float]  # degrees, uniform per sample (reference: (0, 90))
    perspective_p: float  # reference 0.5
    perspective_distortion: float  # reference 0.5 (RandomPerspective's distortion_scale)
    autocontrast_p: float  # reference 0.5
    channels: int = 3  # output channels (grey replicated)

    def __post_init__(self) -> None:
        if self.crop < 1:
            raise ValueError(f"AugmentSpec.crop must be >= 1, got {self.crop}")
        if len(self.rotation) != 2 or self.rotation[0] > self.rotation[1]:
            raise ValueError(f"AugmentSpec.rotation must be (low, high) with low <= high, got {self.rotation}")
        for name in ("perspective_p", "perspective_distortion", "autocontrast_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentSpec.{name} must be in [0, 1], got {value}")
        if self.channels < 1:
            raise ValueError(f"AugmentSpec.channels must be >= 1, got {self.channels}")


# ------------------------------------------------------------------------------------------ inputs
def _as_bhw(x: torch.Tensor) -> torch.Tensor:
    """Accept uint8 (B, H, W) or (B, 1, H, W); return a (B, H, W) view."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {x.dtype}")
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) grey images, got shape {tuple(x.shape)}")
        return x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
    return x


def _hw(in_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(in_size, int):
        return in_size, in_size
    h, w = in_size
    return int(h), int(w)


# ------------------------------------------------------------------------------------- parameters
# Column layout of the single uniform draw made per batch.
_COL_TOP, _COL_LEFT, _COL_ANGLE, _COL_PERSP, _COL_CORNERS, _COL_AC = 0, 1, 2, 3, slice(4, 12), 12
_N_COLS = 13


def sample_params(
    batch: int, in_size: int | tuple[int, int], spec: AugmentSpec, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Draw every per-sample parameter for a batch in one call on ``generator`` (on its device).

    Returns a dict of tensors (leading dim ``batch``):
      ``top``, ``left`` (int64): crop offsets, uniform integers like ``RandomCrop.get_params``;
      ``angle`` (float64, degrees): uniform on ``spec.rotation``;
      ``perspective`` (bool): applied with prob ``spec.perspective_p``;
      ``startpoints``, ``endpoints`` (float64, (B, 4, 2), [x, y] of TL, TR, BR, BL): the corners
      ``RandomPerspective.get_params(crop, crop, distortion)`` draws (always drawn, used where applied);
      ``autocontrast`` (bool): applied with prob ``spec.autocontrast_p``.
    The same generator state always yields the same parameters; the global RNG is never touched.
    """
    h, w = _hw(in_size)
    c = spec.crop
    if h < c or w < c:
        raise ValueError(f"crop {c} is larger than the input {h}x{w}")
    u = torch.rand(batch, _N_COLS, dtype=torch.float64, generator=generator, device=generator.device)

    def uniform_int(col: torch.Tensor, n: int) -> torch.Tensor:  # integers in [0, n)
        return torch.clamp((col * n).floor(), max=n - 1).long()

    top = uniform_int(u[:, _COL_TOP], h - c + 1)
    left = uniform_int(u[:, _COL_LEFT], w - c + 1)
    lo, hi = float(spec.rotation[0]), float(spec.rotation[1])
    angle = lo + u[:, _COL_ANGLE] * (hi - lo)

    # RandomPerspective.get_params(width=c, height=c): each corner coordinate is uniform over n + 1
    # integers, starting at 0 (left / top) or at side - 1 - n (right / bottom).
    nx = int(spec.perspective_distortion * (c // 2))
    ny = int(spec.perspective_distortion * (c // 2))
    k = u[:, _COL_CORNERS].reshape(batch, 4, 2)
    kx = uniform_int(k[..., 0], nx + 1).double()
    ky = uniform_int(k[..., 1], ny + 1).double()
    x_low = torch.tensor([0.0, c - 1 - nx, c - 1 - nx, 0.0], dtype=torch.float64, device=u.device)
    y_low = torch.tensor([0.0, 0.0, c - 1 - ny, c - 1 - ny], dtype=torch.float64, device=u.device)
    endpoints = torch.stack([x_low + kx, y_low + ky], dim=-1)
    start = torch.tensor([[0, 0], [c - 1, 0], [c - 1, c - 1], [0, c - 1]], dtype=torch.float64, device=u.device)
    startpoints = start.expand(batch, 4, 2).clone()

    return {
        "top": top,
        "left": left,
        "angle": angle,
        "perspective": u[:, _COL_PERSP] < spec.perspective_p,
        "startpoints": startpoints,
        "endpoints": endpoints,
        "autocontrast": u[:, _COL_AC] < spec.autocontrast_p,
    }


def perspective_matrices(startpoints: torch.Tensor, endpoints: torch.Tensor) -> torch.Tensor:
    """(B, 4, 2) corner pairs -> (B, 3, 3) float64 homographies mapping endpoints to startpoints.

    Same system as torchvision's ``_get_perspective_coeffs`` (output -> input), solved batched.
    """
    s = startpoints.to(torch.float64)
    e = endpoints.to(torch.float64)
    b = s.shape[0]
    ex, ey = e[..., 0], e[..., 1]
    sx, sy = s[..., 0], s[..., 1]
    one, zero = torch.ones_like(ex), torch.zeros_like(ex)
    rows_x = torch.stack([ex, ey, one, zero, zero, zero, -sx * ex, -sx * ey], dim=-1)  # (B, 4, 8)
    rows_y = torch.stack([zero, zero, zero, ex, ey, one, -sy * ex, -sy * ey], dim=-1)
    a = torch.stack([rows_x, rows_y], dim=2).reshape(b, 8, 8)
    rhs = torch.stack([sx, sy], dim=2).reshape(b, 8)
    coeffs = torch.linalg.solve(a, rhs)
    return torch.cat([coeffs, torch.ones(b, 1, dtype=coeffs.dtype, device=coeffs.device)], dim=1).reshape(b, 3, 3)


def rotation_matrices(angle_deg: torch.Tensor, crop: int) -> torch.Tensor:
    """(B,) angles -> (B, 2, 3) float64 affine maps from rotated-image to crop edge coordinates.

    Matches ``F.rotate(img, angle)`` (counter-clockwise for positive angles, about the image centre).
    """
    a = torch.deg2rad(angle_deg.to(torch.float64))
    cos, sin = torch.cos(a), torch.sin(a)
    ctr = crop / 2.0
    # q = ctr + [[cos, -sin], [sin, cos]] (r - ctr)
    tx = ctr - (cos * ctr - sin * ctr)
    ty = ctr - (sin * ctr + cos * ctr)
    return torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], dim=1)


def _border_weight(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear weight a zero-padded all-ones image of ``size`` pixels has at edge coordinate ``coord``."""
    return torch.clamp(torch.minimum(coord + 0.5, (size + 0.5) - coord), 0.0, 1.0)


# -------------------------------------------------------------------------------------- application
def apply_params(x: torch.Tensor, params: dict[str, torch.Tensor], spec: AugmentSpec) -> torch.Tensor:
    """Apply fixed per-sample parameters (see :func:`sample_params`) to uint8 grey images.

    ``x``: uint8 (B, H, W) or (B, 1, H, W) on any device. Returns float32 (B, spec.channels, crop, crop)
    in [-1, 1] on ``x.device``.
    """
    img = _as_bhw(x)
    b, h, w = img.shape
    c = spec.crop
    dev = img.device
    if h < c or w < c:
        raise ValueError(f"crop {c} is larger than the input {h}x{w}")
    if b == 0:
        return torch.zeros(0, spec.channels, c, c, dtype=torch.float32, device=dev)

    # Small per-sample matrices in float64 wherever the params live (normally the CPU), then moved.
    persp_on = params["perspective"].bool()
    hp = perspective_matrices(params["startpoints"], params["endpoints"])
    eye = torch.eye(3, dtype=hp.dtype, device=hp.device).expand_as(hp)
    hp = torch.where(persp_on.to(hp.device)[:, None, None], hp, eye)
    angle = params["angle"].to(torch.float64)
    rot = rotation_matrices(angle, c)  # rotated-image -> crop coordinates
    top = params["top"].to(rot.device, torch.float64)
    left = params["left"].to(rot.device, torch.float64)
    # crop -> input coordinates (shift by the crop offset), then -> grid_sample's [-1, 1] (align_corners=False).
    sx, sy = 2.0 / w, 2.0 / h
    to_grid = torch.stack(
        [
            torch.stack([rot[:, 0, 0] * sx, rot[:, 0, 1] * sx, (rot[:, 0, 2] + left) * sx - 1.0], -1),
            torch.stack([rot[:, 1, 0] * sy, rot[:, 1, 1] * sy, (rot[:, 1, 2] + top) * sy - 1.0], -1),
        ],
        dim=1,
    )  # (B, 2, 3): rotated-image coordinates -> normalised input coordinates
    # F.rotate by a multiple of 90 degrees of a square image is an exact pixel permutation (torchvision
    # takes a rot90 fast path), so the rotated image has no bilinear border of its own in that case.
    exact_rot = torch.remainder(angle, 90.0) == 0
    border_idx = torch.nonzero(persp_on.cpu() & ~exact_rot.cpu()).flatten()  # on the CPU: no device sync

    # One homography per sample: output pixel -> normalised input coordinates (float64, then float32).
    last_row = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=to_grid.dtype, device=to_grid.device).expand(b, 1, 3)
    to_grid_h = torch.cat([to_grid, last_row], dim=1)
    full_t = torch.bmm(to_grid_h, hp).transpose(1, 2).to(dev, torch.float32)  # (B, 3, 3), row vectors
    top_d = params["top"].to(dev)
    left_d = params["left"].to(dev)
    ac_on = params["autocontrast"].bool().to(dev)

    # Output pixel centres in edge coordinates, shared by the batch: (N, 3), N = c * c.
    t = torch.arange(c, device=dev, dtype=torch.float32) + 0.5
    base = torch.stack([t.repeat(c), t.repeat_interleave(c), torch.ones(c * c, device=dev)], dim=1)

    # All sampling grids at once. Points on or behind the perspective's horizon (never for corners drawn
    # as RandomPerspective does: the denominator is shared by all steps and positive on the drawn quad)
    # are pushed far outside and read as fill.
    gh = torch.matmul(base, full_t)  # (B, N, 3)
    grid = (gh[..., :2] / gh[..., 2:].clamp_min(1e-6)).view(b, c, c, 2)

    # Zero every sample's input outside its own crop window: exact zero padding of the cropped image.
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    in_rows = (rows >= top_d[:, None]) & (rows < top_d[:, None] + c)
    in_cols = (cols >= left_d[:, None]) & (cols < left_d[:, None] + c)
    src = img.to(torch.float32).mul_(in_rows[:, :, None] & in_cols[:, None, :])

    out = nnf.grid_sample(src[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.view(b, c * c)  # grey levels in [0, 255]

    # Zero padding of the rotated image as seen by the perspective: the bilinear weight of its frame,
    # prod over x, y of clamp(c/2 + 1/2 - |r - c/2|, 0, 1). Only where both steps are non-trivial.
    if border_idx.numel():
        hp_sub = hp[border_idx.to(hp.device)].transpose(1, 2).to(dev, torch.float32)
        border_idx = border_idx.to(dev)
        rh = torch.matmul(base, hp_sub)  # rotated-image coordinates of the output pixels
        r = rh[..., :2] / rh[..., 2:].clamp_min(1e-6)
        half = c / 2.0
        weight = r.sub_(half).abs_().neg_().add_(half + 0.5).clamp_(0.0, 1.0)
        out[border_idx] *= weight[..., 0] * weight[..., 1]

    # Autocontrast (per image, min -> 0, max -> 255, flat images unchanged) fused with x / 127.5 - 1.
    mn, mx = torch.aminmax(out, dim=1, keepdim=True)
    stretch = ac_on[:, None] & (mx > mn)
    span = torch.where(stretch, mx - mn, torch.full_like(mx, 255.0))
    scale = 2.0 / span
    shift = torch.where(stretch, mn, torch.zeros_like(mn)).mul_(-scale).sub_(1.0)
    out = torch.addcmul(shift, out, scale).clamp_(-1.0, 1.0)

    out = out.view(b, 1, c, c)
    if spec.channels != 1:
        out = out.expand(b, spec.channels, c, c).contiguous()
    return out


def augment_batch(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a batch of uint8 grey images on their own device (see module docstring).

    ``x``: uint8 (B, H, W) or (B, 1, H, W). Returns float32 (B, spec.channels, crop, crop) in [-1, 1].
    All randomness comes from ``generator`` (a CPU generator is fine); same state -> same output.
    """
    img = _as_bhw(x)
    params = sample_params(img.shape[0], (img.shape[1], img.shape[2]), spec, generator)
    return apply_params(img, params, spec)


def center_crop_normalize(x: torch.Tensor, crop: int, channels: int = 3) -> torch.Tensor:
    """Evaluation transform: centre crop (``F.center_crop`` offsets), float, mean = std = 0.5, grey replicated."""
    img = _as_bhw(x)
    b, h, w = img.shape
    if h < crop or w < crop:
        raise ValueError(f"crop {crop} is larger than the input {h}x{w}")
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    out = img[:, None, top : top + crop, left : left + crop].to(torch.float32) / 127.5 - 1.0
    if channels != 1:
        out = out.expand(b, channels, crop, crop).contiguous()
    return out


# ---------------------------------------------------------------------------------------- reference
def _to_rgb(img):  # module-level (not a lambda) so the transform pickles into DataLoader workers
    return img.convert("RGB")


def reference_pil_transform(spec: AugmentSpec):
    """The authors' per-image PIL design, as a ``torchvision.transforms.Compose`` on PIL 'L' images."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(_to_rgb),
            T.RandomCrop(spec.crop),
            T.RandomRotation(tuple(spec.rotation)),
            T.RandomGrayscale(0.5),
            T.RandomPerspective(
                distortion_scale=spec.perspective_distortion,
                p=spec.perspective_p,
                interpolation=T.InterpolationMode.BICUBIC,
            ),
            T.RandomAutocontrast(spec.autocontrast_p),
            T.ToTensor(),
            T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )

"""Procedural chest radiographs drawn from a :class:`~mflag.synth.world.Case`.

The anatomy lives in a normalised frame: X runs across the image from -1 (image left = the
patient's right) to +1, Y runs down with the same unit, the thorax centred. A random similarity
transform (small rotation, scale, shift) maps that frame to pixels. Everything is summed into an
attenuation map (bigger = denser), turned into detector intensity with ``1 - exp(-mu * A)``, and
then given the dataset's "scanner style" (gamma, contrast, blur, noise, collimation border).

Returned alongside the image is the truth the datasets' labels need: lung polygons, the
pneumothorax mask, one box per pneumonia patch, and the foreign objects' shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import gaussian_filter

from mflag.synth.world import Case, Finding

DRAW_FACTOR = 3  # the smooth anatomy is drawn at 1/3 resolution, then upsampled
SIZE_SCALE = {"small": 0.6, "moderate": 1.0, "large": 1.5}
ZONE_Y = {"upper": -0.42, "middle": -0.08, "lower": 0.22}  # centre height of each lung zone


@dataclass
class Style:
    gamma: float
    contrast: float
    brightness: float
    noise: float
    blur: float
    border: float
    equalize: bool
    pneumonia_scale: float = 1.0  # size of the pneumonia (consolidation) patches, x the base radius
    object_scale: float = 1.0  # size of the foreign objects (coins, buttons, clips, wire width)


@dataclass
class Rendering:
    image: np.ndarray  # (H, W) uint8, bright = dense
    lungs: list[np.ndarray]  # polygons (n, 2) in pixel x, y: [patient right lung, patient left lung]
    ptx_mask: np.ndarray | None  # (H, W) uint8 0/1 pneumothorax, or None
    opacity_boxes: list[tuple[float, float, float, float]]  # pneumonia patches, pixel x1, y1, x2, y2
    objects: list[tuple[int, list[float]]] = field(default_factory=list)  # Object-CXR shapes (type, coords)


class Frame:
    """The anatomy frame of an H x W image under a similarity transform.

    Drawing happens upright: ``X`` is a (1, W) row and ``Y`` an (H, 1) column, so terms that depend
    on one axis cost one row or column and the rest broadcast. :meth:`rotate` then turns the finished
    drawing about the frame's centre; :meth:`to_pixels` (rotation included) gives truth coordinates.
    """

    def __init__(self, width: int, height: int, rotation: float, scale: float, shift: tuple[float, float]):
        self.width, self.height = width, height
        self.unit = width / 2.0 * scale  # pixels per frame unit
        self.rotation = rotation
        self.cos, self.sin = math.cos(rotation), math.sin(rotation)
        self.cx = width / 2.0 + shift[0] * width / 2.0
        self.cy = height / 2.0 + shift[1] * width / 2.0 + 0.04 * height
        self.X = ((np.arange(width, dtype=np.float32) + 0.5 - self.cx) / self.unit)[None, :]
        self.Y = ((np.arange(height, dtype=np.float32) + 0.5 - self.cy) / self.unit)[:, None]
        self.shape = (height, width)

    def to_pixels(self, pts: np.ndarray, rotate: bool = True) -> np.ndarray:
        """Frame points (n, 2) -> pixel coordinates (n, 2) of the final (rotated) image."""
        x, y = pts[:, 0] * self.unit, pts[:, 1] * self.unit
        if not rotate:
            return np.stack([x + self.cx, y + self.cy], axis=1)
        return np.stack([self.cos * x - self.sin * y + self.cx, self.sin * x + self.cos * y + self.cy], axis=1)

    def fill(self, pts: np.ndarray, soft: float = 0.0, rotate: bool = False) -> np.ndarray:
        """Rasterise a frame polygon into a float mask in [0, 1], optionally with a soft edge (frame units)."""
        img = Image.new("L", (self.width, self.height), 0)
        ImageDraw.Draw(img).polygon([tuple(p) for p in self.to_pixels(pts, rotate)], fill=255)
        if soft > 0:
            img = img.filter(ImageFilter.GaussianBlur(soft * self.unit))
        return np.asarray(img, dtype=np.float32) / 255.0

    def rotate(self, img: np.ndarray) -> np.ndarray:
        """Turn an upright drawing into the final orientation (same convention as to_pixels)."""
        if self.rotation == 0:
            return img
        pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))
        return np.asarray(pil.rotate(-math.degrees(self.rotation), Image.BILINEAR, center=(self.cx, self.cy)))

    def box_to_pixels(self, box: tuple[float, float, float, float], other: "Frame") -> tuple[float, ...]:
        """An upright box in this frame's pixels -> the enclosing box in `other`'s final pixels."""
        x1, y1, x2, y2 = box
        corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
        pts = np.stack([(corners[:, 0] - self.cx) / self.unit, (corners[:, 1] - self.cy) / self.unit], axis=1)
        px = other.to_pixels(pts)
        lo = np.clip(px.min(0), 0, None)
        hi = np.minimum(px.max(0), [other.width, other.height])
        return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a small random grid upsampled bicubically."""
    h, w = shape
    grid = rng.standard_normal((cells, max(2, int(round(cells * w / h))))).astype(np.float32)
    up = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))
    return np.clip(up / 2.0, -1.0, 1.0)


def _ellipse(X, Y, cx, cy, rx, ry, sharp=6.0):
    r2 = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2
    return 1.0 / (1.0 + np.exp(np.minimum(sharp * (r2 - 1.0), 60.0)))


def _blob(X, Y, cx, cy, r):
    return np.exp(-(((X - cx) ** 2 + (Y - cy) ** 2) / (2 * r * r)))


# ------------------------------------------------------------------------------------- anatomy
@dataclass
class Anatomy:
    """Per-image shape parameters of the thorax (frame units)."""

    lung_width: float
    lung_top: float
    dome_right: float
    dome_left: float
    heart_half: float
    heart_cy: float
    mediastinum: float
    rib_spacing: float
    rib_phase: float

    @classmethod
    def sample(cls, rng: np.random.Generator, case: Case) -> "Anatomy":
        ap = case.view == "AP"
        inspiration = rng.uniform(0.9, 1.05) * (0.93 if ap else 1.0)  # portable films: shallower breath
        heart = rng.uniform(0.33, 0.38) * (1.08 if ap else 1.0)  # AP magnifies the heart
        cardio = case.get("cardiomegaly")
        if cardio:
            heart *= {"small": 1.2, "moderate": 1.32, "large": 1.45}[cardio[0].size]
        dome = 0.36 * inspiration + rng.uniform(-0.03, 0.03)
        return cls(
            lung_width=rng.uniform(0.74, 0.82),
            lung_top=rng.uniform(-0.84, -0.76),
            dome_right=dome,
            dome_left=dome + rng.uniform(0.02, 0.07),  # the left dome sits lower
            heart_half=heart,
            heart_cy=0.2 + rng.uniform(-0.03, 0.03),
            mediastinum=rng.uniform(0.11, 0.14),
            rib_spacing=rng.uniform(0.115, 0.13) * inspiration,
            rib_phase=rng.uniform(0, 1),
        )

    def lung_polygon(self, side: str, n: int = 48) -> np.ndarray:
        """Outline of one lung (frame units): apex, lateral wall, costophrenic angle, dome, medial border."""
        s = -1.0 if side == "right" else 1.0  # patient right = image left
        dome = self.dome_right if side == "right" else self.dome_left
        medial = 0.1 if side == "right" else 0.13
        w, top = self.lung_width, self.lung_top
        t = np.linspace(0, 1, n)
        # lateral wall from apex down to the costophrenic angle (bulging outwards)
        lat_x = medial + 0.12 + (w - medial - 0.12) * np.sin(np.pi / 2 * t) ** 0.55
        lat_y = top + (dome + 0.2 - top) * t
        # dome from the angle back to the medial end, peaking above the angle
        u = np.linspace(0, 1, n // 2)
        dome_x = w - (w - medial) * u
        dome_y = dome + 0.2 - 0.2 * np.sin(np.pi * np.clip(u * 0.75 + 0.1, 0, 1)) - 0.05 * u
        if side == "left":  # cardiac notch: the heart takes the medial lower part of the left lung
            dome_x = np.where(u > 0.45, dome_x + 0.12 * (u - 0.45) / 0.55, dome_x)
        # medial border up to the apex
        v = np.linspace(0, 1, n // 2)
        med_x = medial + (0.12 if side == "left" else 0.0) * (1 - v) + 0.1 * np.sin(np.pi * v) ** 3 * 0
        med_y = dome_y[-1] + (top + 0.05 - dome_y[-1]) * v
        xs = np.concatenate([lat_x, dome_x, med_x, [medial + 0.06]])
        ys = np.concatenate([lat_y, dome_y, med_y, [top]])
        return np.stack([s * xs, ys], axis=1).astype(np.float32)

    def hilum(self, side: str) -> tuple[float, float]:
        return (-0.22 if side == "right" else 0.24), -0.06


def _heart(fr: Frame, an: Anatomy) -> np.ndarray:
    return _ellipse(fr.X, fr.Y, 0.06 + 0.25 * (an.heart_half - 0.35), an.heart_cy, an.heart_half, 0.24, 5.0)


def _frontal_attenuation(fr: Frame, an: Anatomy, lungs_fill, heart, markings) -> np.ndarray:
    X, Y = fr.X, fr.Y
    ax = np.abs(X)
    # body: torso widening from the neck to the shoulders, soft edges
    half_width = 0.22 + 0.68 * np.sqrt(np.clip((Y + 1.0) / 0.42, 0, 1))
    body = 1.0 / (1.0 + np.exp(np.minimum((ax - half_width) / 0.025, 60.0)))
    A = 0.5 * body + 0.12 * body * np.clip((Y - an.dome_right) / 0.4, 0, 1)  # abdomen denser
    lungs = lungs_fill[0] + lungs_fill[1]
    A -= 0.34 * lungs * (1.0 - 0.15 * np.clip((Y - an.lung_top) / 1.1, 0, 1))  # thicker tissue at the bases
    # mediastinum (from the thoracic inlet down) and heart
    med_half = an.mediastinum + 0.03 * np.clip(Y + 0.2, 0, 1)
    inlet = np.clip((Y - an.lung_top + 0.15) / 0.2, 0, 1) * (Y < an.heart_cy + 0.1)
    m2 = ((X - 0.02) / med_half) ** 2
    A += 0.07 * np.exp(-(m2 * m2)) * inlet
    A += 0.06 * _ellipse(X, Y, 0.16, -0.36, 0.07, 0.06)  # aortic knob
    A += 0.06 * heart
    # trachea down to the carina (air, darker)
    A -= 0.1 * np.exp(-((X / 0.03) ** 2)) * (Y < -0.32)
    # spine with vertebral bodies
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * (Y / 0.105))
    x2 = (X / 0.075) ** 2
    A += (0.06 + 0.03 * vert) * np.exp(-(x2 * x2))
    # posterior ribs: curves rising from the spine and falling at the lateral wall
    t = np.clip(ax - 0.08, 0, None)
    u = (Y + 0.3 * t - 0.75 * t**2 - an.lung_top) / an.rib_spacing + an.rib_phase
    band = np.maximum(np.cos(2 * np.pi * u), 0)
    band = band * band
    band = band * band * band
    A += 0.075 * band * ((u > 0.5) & (u < 10.5) & (ax > 0.07)) * body * np.clip((an.lung_width + 0.08 - t) / 0.1, 0, 1)
    # anterior ribs, fainter, sloping down towards the midline
    ua = (Y - 0.35 * t + 0.1 - an.lung_top) / (an.rib_spacing * 1.2)
    ca = np.maximum(np.cos(2 * np.pi * ua), 0)
    ca = ca * ca
    A += 0.03 * ca * ca * lungs * ((ua > 0.5) & (ua < 6.5))
    # clavicles: from the sternal notch out and up to the shoulders
    c = np.clip(ax - 0.1, 0, 1)
    clav_y = an.lung_top + 0.12 - 0.3 * c + 0.2 * c**2
    A += 0.13 * np.exp(-(((Y - clav_y) / 0.028) ** 2)) * (ax > 0.08) * (ax < 0.8)
    # lung markings: vessels fanning out from the hila, fading to the periphery
    for k, side in enumerate(("right", "left")):
        hx, hy = an.hilum(side)
        r = np.sqrt((X - hx) ** 2 + (Y - hy) ** 2)
        A += lungs_fill[k] * (0.07 * markings * np.clip(1.0 - r / 0.8, 0, 1) + 0.12 * np.exp(-((r / 0.09) ** 2)))
    return A


def _lateral_attenuation(fr: Frame, rng, markings) -> np.ndarray:
    """A left lateral view: anterior to the image left, spine on the right."""
    X, Y = fr.X, fr.Y
    body = _ellipse(X, Y, 0.02, 0.0, 0.78, 1.35, 8.0)
    A = 0.6 * body
    lung = _ellipse(X, Y, 0.05, -0.12, 0.55, 0.7, 6.0)
    A -= 0.3 * lung
    A += 0.22 * _ellipse(X, Y, -0.3, 0.32, 0.28, 0.25, 5.0)  # heart, anterior and low
    dome = 0.45 + 0.08 * X**2
    A += 0.25 * (Y > dome) * body
    # vertebral column at the back, bodies and discs
    vert = (np.cos(2 * np.pi * Y / 0.12) > -0.6).astype(np.float32)
    A += 0.2 * np.exp(-(((X - 0.55) / 0.09) ** 4)) * vert * body
    A += 0.08 * np.exp(-(((X + 0.72) / 0.03) ** 2)) * body  # sternum
    A += 0.05 * markings * lung
    return A


# ------------------------------------------------------------------------------------ findings
def _lung_point(rng, an: Anatomy, side: str, zone: str) -> tuple[float, float]:
    s = -1.0 if side == "right" else 1.0
    return s * rng.uniform(0.3, 0.6), ZONE_Y[zone] + rng.uniform(-0.07, 0.07)


def _sides(f: Finding) -> tuple[str, ...]:
    return ("right", "left") if f.side == "bilateral" else (f.side,)


def _consolidation(fr, an, f, rng, lung, boxes, scale: float) -> np.ndarray:
    X, Y = fr.X, fr.Y
    out = np.zeros(fr.shape, np.float32)
    for side in _sides(f):
        k = 0 if side == "right" else 1
        for _ in range(f.count):
            cx, cy = _lung_point(rng, an, side, f.zone)
            r = 0.11 * SIZE_SCALE[f.size] * scale
            patch = np.zeros(fr.shape, np.float32)
            for _ in range(4):  # patchy: a cluster of sub-blobs
                patch = np.maximum(patch, _blob(X, Y, cx + rng.normal(0, r * 0.5), cy + rng.normal(0, r * 0.4), r * rng.uniform(0.5, 0.9)))
            patch *= lung[k]
            region = patch > 0.35
            if region.sum() >= 4:
                ys, xs = np.nonzero(region)
                boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
                out += patch
    return out


def _effusion(fr, an, f, lung) -> np.ndarray:
    X, Y = fr.X, fr.Y
    out = np.zeros(fr.shape, np.float32)
    height = {"small": 0.1, "moderate": 0.3, "large": 0.55}[f.size]
    for side in _sides(f):
        k = 0 if side == "right" else 1
        dome = an.dome_right if side == "right" else an.dome_left
        # fluid level: a meniscus climbing the lateral chest wall
        level = dome + 0.12 - height - 0.25 * (np.abs(X) / an.lung_width) ** 3
        fluid = 1.0 / (1.0 + np.exp(np.minimum(-(Y - level) / 0.02, 60.0)))
        out += fluid * lung[k]
    return out


def _collapsed_lung(an: Anatomy, f: Finding, poly: np.ndarray) -> np.ndarray:
    """The collapsed lung of a pneumothorax: the lung outline shrunk towards its lower medial root."""
    anchor = np.array([poly[:, 0].mean() * 0.5, an.dome_right - 0.05], dtype=np.float32)
    shrink = {"small": 0.12, "moderate": 0.25, "large": 0.42}[f.size]
    return anchor + (1 - shrink) * (poly - anchor)


def _pneumothorax(fr, an, f, poly) -> tuple[np.ndarray, np.ndarray]:
    """Lucent rim (lung minus collapsed lung) and the visceral pleural line along the collapsed edge."""
    collapsed = _collapsed_lung(an, f, poly)
    rim = np.clip(fr.fill(poly) - fr.fill(collapsed), 0, 1)
    thin = collapsed + 0.012 * (collapsed.mean(0) - collapsed)
    edge = np.abs(fr.fill(collapsed, soft=0.008) - fr.fill(thin, soft=0.008))
    return rim, edge


def _covid(fr, an, f, rng, lung, shape) -> np.ndarray:
    X, Y = fr.X, fr.Y
    peripheral = np.clip((np.abs(X) - 0.35) / 0.35, 0, 1)
    lower = np.clip((Y + 0.3) / 0.6, 0, 1)
    patchy = np.clip(0.6 + _smooth_noise(rng, shape, 7), 0, 1)
    return (lung[0] + lung[1]) * peripheral * lower * patchy * SIZE_SCALE[f.size]


def _edema(fr, an, f, rng, lung) -> np.ndarray:
    X, Y = fr.X, fr.Y
    haze = np.zeros(fr.shape, np.float32)
    for k, side in enumerate(("right", "left")):
        hx, hy = an.hilum(side)
        haze += lung[k] * _blob(X, Y, hx, hy + 0.05, 0.22 * SIZE_SCALE[f.size] ** 0.5)
    if f.size != "small":  # Kerley B lines: short horizontal lines at the lateral bases
        for k in range(6):
            y0 = an.dome_right - 0.05 - 0.035 * k
            haze += 0.5 * np.exp(-(((Y - y0) / 0.006) ** 2)) * (np.abs(X) > an.lung_width - 0.12) * (lung[0] + lung[1])
    return haze


def _atelectasis(fr, an, f, rng, lung) -> np.ndarray:
    X, Y = fr.X, fr.Y
    out = np.zeros(fr.shape, np.float32)
    for side in _sides(f):
        k = 0 if side == "right" else 1
        dome = an.dome_right if side == "right" else an.dome_left
        y0 = dome - 0.08 - 0.04 * SIZE_SCALE[f.size]
        slope = rng.uniform(-0.15, 0.15)
        band = np.exp(-(((Y - y0 - slope * X) / (0.018 * SIZE_SCALE[f.size] ** 1.5)) ** 2))
        out += lung[k] * band
    return out


def _nodules(fr, an, f, rng, lung) -> np.ndarray:
    out = np.zeros(fr.shape, np.float32)
    for _ in range(f.count):
        side = f.side if f.side != "bilateral" else ("right", "left")[int(rng.integers(2))]
        cx, cy = _lung_point(rng, an, side, f.zone)
        r = {"small": 0.018, "moderate": 0.035}.get(f.size, 0.035)
        out += _ellipse(fr.X, fr.Y, cx, cy, r, r, 10.0)
    return out


def _polyline(fr: Frame, pts: np.ndarray, width_px: float) -> np.ndarray:
    img = Image.new("L", (fr.width, fr.height), 0)
    ImageDraw.Draw(img).line([tuple(p) for p in fr.to_pixels(pts, rotate=False)], fill=255, width=max(1, int(round(width_px))))
    return np.asarray(img, dtype=np.float32) / 255.0


def _devices(fr, an, f, rng) -> np.ndarray:
    w = max(1.5, fr.unit * 0.012)
    if f.subtype == "ett":
        tip = -0.42 + rng.uniform(-0.04, 0.04)
        pts = np.array([[0.0, -1.2], [0.005, -0.8], [0.0, tip]])
        return _polyline(fr, pts, w * 1.5)
    if f.subtype == "ngt":
        pts = np.array([[0.02, -1.2], [0.04, -0.5], [0.05, 0.1], [0.12, an.dome_left + 0.12], [0.35, an.dome_left + 0.2]])
        return _polyline(fr, pts, w)
    if f.subtype == "central_line":
        s = -1.0 if rng.random() < 0.7 else 1.0
        pts = np.array([[s * 0.35, -1.0], [s * 0.22, -0.7], [s * 0.12, -0.55], [-0.06, -0.3]])
        return _polyline(fr, pts, w)
    # pacemaker: generator in the left upper chest, leads into the right heart
    gen = _ellipse(fr.X, fr.Y, 0.58, -0.62, 0.09, 0.06, 12.0)
    lead = _polyline(fr, np.array([[0.52, -0.6], [0.3, -0.68], [0.05, -0.45], [-0.05, 0.05], [0.1, 0.28]]), w)
    return np.clip(gen + lead, 0, 1)


def _objects(fr, hi, f, rng, shapes, scale: float) -> np.ndarray:
    """Coins, buttons, clips and wires, anywhere on the body; their Object-CXR shapes are recorded."""
    out = np.zeros(fr.shape, np.float32)
    for _ in range(f.count):
        cx, cy = rng.uniform(-0.65, 0.65), rng.uniform(-0.7, 0.6)
        if f.subtype in ("coin", "button"):
            r = (rng.uniform(0.04, 0.065) if f.subtype == "coin" else rng.uniform(0.025, 0.04)) * scale
            disc = _ellipse(fr.X, fr.Y, cx, cy, r, r, 20.0)
            if f.subtype == "button":  # four thread holes
                for dx, dy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
                    disc -= _ellipse(fr.X, fr.Y, cx + dx * r * 0.3, cy + dy * r * 0.3, r * 0.15, r * 0.15, 20.0)
            out += np.clip(disc, 0, 1)
            (x1, y1), (x2, y2) = hi.to_pixels(np.array([[cx - r, cy - r], [cx + r, cy + r]]))
            shapes.append((1, [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]))
        elif f.subtype == "clip":
            a = rng.uniform(0, np.pi)
            half = np.array([[0.035, 0.012]]) * rng.uniform(0.8, 1.2) * scale
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            poly = corners @ rot.T + [cx, cy]
            out += fr.fill(poly)
            px = hi.to_pixels(poly)
            if rng.random() < 0.5:
                shapes.append((2, [float(v) for v in px.reshape(-1)]))
            else:
                shapes.append((0, [px[:, 0].min(), px[:, 1].min(), px[:, 0].max(), px[:, 1].max()]))
        else:  # wire: a meandering polyline, annotated as a polygon around it
            n = 6
            steps = rng.normal(0, 0.06, size=(n, 2)) + [0.05, 0.02]
            pts = np.cumsum(steps, axis=0) + [cx, cy]
            out += _polyline(fr, pts, max(1.5, fr.unit * 0.008 * scale))
            px = hi.to_pixels(pts)
            pad = 3.0 * scale
            ring = np.concatenate([px + [0, -pad], (px + [0, pad])[::-1]])
            shapes.append((2, [float(v) for v in ring.reshape(-1)]))
    return out


# ----------------------------------------------------------------------------------------- image
_GRAIN_TILE = 1024
_grain: np.ndarray | None = None


def _grain_field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Detector grain: a crop, at a random offset, of one fixed white-noise tile (cheap and deterministic)."""
    global _grain
    if _grain is None:
        _grain = np.random.default_rng(0).standard_normal((_GRAIN_TILE, _GRAIN_TILE), dtype=np.float32)
    h, w = shape
    if h > _GRAIN_TILE or w > _GRAIN_TILE:
        return rng.standard_normal(shape, dtype=np.float32)
    y, x = int(rng.integers(_GRAIN_TILE - h + 1)), int(rng.integers(_GRAIN_TILE - w + 1))
    return _grain[y : y + h, x : x + w]


def _apply_style(intensity: np.ndarray, style: Style, rng, exposure: float) -> np.ndarray:
    img = intensity * exposure
    if style.gamma != 1.0:
        img = np.clip(img, 0, None) ** style.gamma
    img = img * style.contrast + (0.5 - 0.5 * style.contrast + style.brightness)
    img += style.noise * _grain_field(rng, img.shape) * np.sqrt(np.clip(img, 0.05, 1))  # quantum noise ~ sqrt(signal)
    np.clip(img, 0, 1, out=img)
    if style.equalize:
        hist, edges = np.histogram(img, bins=256, range=(0, 1))
        cdf = np.cumsum(hist).astype(np.float32)
        img = np.interp(img, edges[1:], cdf / cdf[-1]).astype(np.float32)
    if style.border > 0:  # collimation: a bright shutter margin on some sides
        h, w = img.shape
        b = int(style.border * min(h, w) * rng.uniform(0.5, 1.5))
        if b > 0:
            img[:b, :] = np.maximum(img[:b, :], 0.92)
            img[-b:, :] = np.maximum(img[-b:, :], 0.92)
    return img


def render(case: Case, width: int, height: int, style: Style, rng: np.random.Generator) -> Rendering:
    """Draw one radiograph of `case`. All randomness comes from `rng`.

    The smooth anatomy is drawn at 1/DRAW_FACTOR resolution (`lo`) and upsampled; the truth (lung polygons,
    pneumothorax mask, boxes, object shapes) is computed in full-resolution pixels (`hi`).
    """
    frontal = case.view != "LATERAL"
    rot = math.radians(rng.uniform(-4, 4))
    scale = rng.uniform(0.9, 1.03) * (1.04 if case.view == "AP" else 1.0)
    shift = (rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03))
    hi = Frame(width, height, rot, scale, shift)
    fr = Frame(max(32, width // DRAW_FACTOR), max(32, height // DRAW_FACTOR), rot, scale, shift)
    shape = (fr.height, fr.width)
    markings = _smooth_noise(rng, shape, 24) * 0.6 + _smooth_noise(rng, shape, 48) * 0.4
    boxes: list = []
    objects: list = []
    ptx_mask = None
    lungs_px: list[np.ndarray] = []
    if frontal:
        an = Anatomy.sample(rng, case)
        polys = [an.lung_polygon("right"), an.lung_polygon("left")]
        lungs_px = [hi.to_pixels(p) for p in polys]
        heart = _heart(fr, an)
        lung = [fr.fill(p, soft=0.012) * (1.0 - heart) for p in polys]  # the heart hides the lung behind it
        ptx = case.get("pneumothorax")
        if ptx:
            poly = polys[0 if ptx[0].side == "right" else 1]
            rim, pleural_line = _pneumothorax(fr, an, ptx[0], poly)
            truth = hi.fill(poly, rotate=True) - hi.fill(_collapsed_lung(an, ptx[0], poly), rotate=True)
            ptx_mask = (truth > 0.5).astype(np.uint8)
            markings = markings * (1 - rim)
        A = _frontal_attenuation(fr, an, lung, heart, markings)
        if ptx:
            A += -0.07 * rim + 0.1 * pleural_line
        for f in case.findings:
            if f.kind == "consolidation":
                patch = _consolidation(fr, an, f, rng, lung, boxes, style.pneumonia_scale)
                A += 0.4 * patch
            elif f.kind == "effusion":
                A += 0.34 * _effusion(fr, an, f, lung)
            elif f.kind == "edema":
                A += 0.14 * _edema(fr, an, f, rng, lung)
            elif f.kind == "covid":
                A += 0.17 * _covid(fr, an, f, rng, lung, shape)
            elif f.kind == "atelectasis":
                A += 0.22 * _atelectasis(fr, an, f, rng, lung)
            elif f.kind == "nodule":
                A += 0.22 * _nodules(fr, an, f, rng, lung)
            elif f.kind == "device":
                A += 0.6 * _devices(fr, an, f, rng)
            elif f.kind == "foreign_object":
                A += 0.9 * _objects(fr, hi, f, rng, objects, style.object_scale)
        boxes = [fr.box_to_pixels(b, hi) for b in boxes]
    else:
        A = _lateral_attenuation(fr, rng, markings)
        for f in case.findings:
            if f.kind in ("consolidation", "effusion"):
                A += 0.2 * _blob(fr.X, fr.Y, rng.uniform(-0.2, 0.3), 0.3 if f.kind == "effusion" else 0.0, 0.15)
    A = fr.rotate(A)
    if style.blur > 0:  # detector sharpness, at drawing resolution (the upsampling adds its own)
        A = gaussian_filter(A, style.blur * fr.width / width)
    intensity = (1.0 - np.exp(-2.2 * np.clip(A, 0, None))) / (1.0 - math.exp(-2.2))
    intensity = np.asarray(Image.fromarray(intensity.astype(np.float32)).resize((width, height), Image.BICUBIC))
    img = _apply_style(intensity, style, rng, exposure=rng.uniform(0.92, 1.08))
    return Rendering(
        image=(img * 255.0 + 0.5).astype(np.uint8),
        lungs=lungs_px,
        ptx_mask=ptx_mask,
        opacity_boxes=boxes,
        objects=objects,
    )

"""The image cache: geometry against hand computations, skip accounting, atomicity, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mflag.data.cache import build_cache, fit_square
from mflag.data.split import read_split_csv
from mflag.data.table import DataError, DatasetTable

S = 64


def two_tone(h: int, w: int) -> np.ndarray:
    """Left half 200, right half 100: the split column locates the content horizontally."""
    img = np.full((h, w), 100, dtype=np.uint8)
    img[:, : w // 2] = 200
    return img


def rle_column_major(mask: np.ndarray) -> str:
    """SIIM stage-1 RLE written from scratch: (start relative to the previous run's end, length)."""
    flat = mask.T.reshape(-1)
    out, pos, prev_end = [], 0, 0
    while pos < flat.size:
        if flat[pos]:
            end = pos
            while end < flat.size and flat[end]:
                end += 1
            out += [pos - prev_end, end - pos]
            prev_end = pos = end
        else:
            pos += 1
    return " ".join(map(str, out))


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_dataset(root: Path) -> tuple[DatasetTable, pd.DataFrame]:
    """Five split rows: two good PNGs (wide and tall), a SIIM-style one, one truncated, one missing."""
    save_png(root / "img/wide.png", two_tone(50, 100))  # 100 wide x 50 high
    save_png(root / "img/tall.png", np.full((60, 30), 50, dtype=np.uint8))
    rect = np.full((40, 80), 30, dtype=np.uint8)
    rect[10:20, 20:50] = 255
    save_png(root / "img/rect.png", rect)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    save_png(root / "img/trunc.png", noise)
    data = (root / "img/trunc.png").read_bytes()
    (root / "img/trunc.png").write_bytes(data[: len(data) // 2])
    save_png(root / "img/lateral.png", noise)  # in the table, not in the split

    ids = ["gone", "rect", "tall", "trunc", "wide"]
    rows = pd.DataFrame(
        {
            "image_id": ids + ["lateral"],
            "patient_id": [f"p{i}" for i in range(6)],
            "path": [f"img/{i}.png" for i in ids] + ["img/lateral.png"],
            "official_split": [""] * 6,
            "target": [0, 1, 0, 0, 1, 0],
        }
    )
    mask = np.zeros((40, 80), dtype=np.uint8)
    mask[10:20, 20:50] = 1
    table = DatasetTable(
        rows=rows,
        dropped=[("img/badlabel.png", "bad label")],
        excluded={"lateral": 3},
        boxes={"wide": [(10.0, 5.0, 60.0, 25.0)], "tall": [(0.0, 0.0, 30.0, 60.0)]},
        rles={"rect": [rle_column_major(mask)]},
    )
    split = rows.iloc[:5].drop(columns="official_split").copy()
    split.insert(3, "split", ["train", "train", "valid", "test", "train"])
    split.insert(4, "pct", pd.array([100, 1, pd.NA, pd.NA, 10], dtype="Int64"))
    return table, split


def build(tmp_path: Path, dataset: str, out_name: str = "cache", workers: int = 1, max_skip: float = 0.5, **kw):
    table, split = make_dataset(tmp_path / "raw")
    out_dir = tmp_path / out_name
    quality = tmp_path / f"{out_name}.quality.json"
    summary = build_cache(
        table, split, tmp_path / "raw", out_dir, S, workers, max_skip, dataset, quality,
        split_dropped=[("img/other.png", "patient also in official test")], **kw,
    )
    return out_dir, quality, summary


def test_fit_square_matches_hand_geometry():
    out, scale, ox, oy = fit_square(two_tone(50, 100), S)
    assert (scale, ox, oy) == (0.64, 0.0, 16.0)  # 100x50 -> 64x32, 16 zero rows above and below
    assert out.dtype == np.uint8 and out.shape == (S, S)
    assert not out[:16].any() and not out[48:].any()
    assert (out[16:48, :30] == 200).all() and (out[16:48, 35:] == 100).all()

    out, scale, ox, oy = fit_square(np.full((60, 30), 50, np.uint8), S)  # upscaled: 64 high, 32 wide
    assert (ox, oy) == (16.0, 0.0) and scale == pytest.approx(64 / 60)
    assert not out[:, :16].any() and not out[:, 48:].any() and (out[:, 16:48] == 50).all()

    mask = np.zeros((40, 80), np.uint8)
    mask[10:20, 20:50] = 1
    m, *_ = fit_square(mask, S, nearest=True)
    assert set(np.unique(m)) == {0, 1}
    expected = np.zeros((S, S), bool)
    expected[16 + 8 : 16 + 16, 16:40] = True  # rows 10..20 and cols 20..50 times 0.8, 16 rows of padding
    assert (m.astype(bool) == expected).all()


def test_rsna_cache(tmp_path):
    out_dir, quality, summary = build(tmp_path, "rsna", workers=2)
    assert sorted(p.name for p in out_dir.iterdir()) == ["boxes.csv", "images.npy", "index.csv", "masks.npy"]
    index = read_split_csv(out_dir / "index.csv")
    assert index["image_id"].tolist() == ["rect", "tall", "wide"]  # split order, unreadable ones gone
    assert index["pct"].tolist()[0] == 1 and pd.isna(index["pct"].tolist()[1])
    images = np.load(out_dir / "images.npy", mmap_mode="r")
    masks = np.load(out_dir / "masks.npy", mmap_mode="r")
    assert isinstance(images, np.memmap) and images.dtype == np.uint8 and images.shape == (3, S, S)
    assert masks.dtype == np.uint8 and masks.shape == (3, S, S) and set(np.unique(masks)) <= {0, 1}
    assert (images[2] == fit_square(two_tone(50, 100), S)[0]).all()

    # Box (10, 5, 60, 25) on the 100x50 image: x * 0.64, y * 0.64 + 16.
    boxes = pd.read_csv(out_dir / "boxes.csv")
    assert list(boxes.columns) == ["image_id", "x1", "y1", "x2", "y2"]
    wide = boxes[boxes["image_id"] == "wide"].iloc[0]
    assert [wide.x1, wide.y1, wide.x2, wide.y2] == pytest.approx([6.4, 19.2, 38.4, 32.0])
    tall = boxes[boxes["image_id"] == "tall"].iloc[0]
    assert [tall.x1, tall.y1, tall.x2, tall.y2] == pytest.approx([16, 0, 48, 64])
    # The mask holds the pixels whose centres lie inside the mapped box.
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    inside = (xx >= 6.4) & (xx < 38.4) & (yy >= 19.2) & (yy < 32.0)
    assert (masks[2].astype(bool) == inside).all()
    assert not masks[0].any()  # no box for 'rect'
    assert (masks[1] == (images[1] > 0)).all()  # a whole-image box covers exactly the content

    report = json.loads(quality.read_text())
    assert report["counts"] == {
        "read": 5,
        "kept": 3,
        "skipped": 2,
        "excluded": {"lateral": 3, "outside_splits": 1},
        "dropped_by_split": 2,
    }
    entries = {e["path"]: e["reason"] for e in report["skipped"]}
    assert entries["img/gone.png"] == "missing file"
    assert entries["img/trunc.png"].startswith("img/trunc.png: ")  # reader message, root-relative
    assert entries["img/badlabel.png"] == "bad label"
    assert entries["img/other.png"] == "patient also in official test"
    assert summary["kept"] == 3 and summary["skipped"] == 2 and summary["images_per_second"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_siim_mask_in_image_geometry(tmp_path):
    out_dir, _, _ = build(tmp_path, "siim")
    assert not (out_dir / "boxes.csv").exists()
    index = read_split_csv(out_dir / "index.csv")
    i = index["image_id"].tolist().index("rect")
    image = np.load(out_dir / "images.npy")[i]
    mask = np.load(out_dir / "masks.npy")[i].astype(bool)
    bright = image > (30 + 255) / 2
    assert mask.sum() > 0 and (mask & bright).sum() / (mask | bright).sum() > 0.9
    others = [j for j in range(len(index)) if j != i]
    assert not np.load(out_dir / "masks.npy")[others].any()


def test_objcxr_has_boxes_without_masks(tmp_path):
    out_dir, _, _ = build(tmp_path, "objcxr")
    assert sorted(p.name for p in out_dir.iterdir()) == ["boxes.csv", "images.npy", "index.csv"]


def test_identical_bytes_across_runs_and_worker_counts(tmp_path):
    a, qa, _ = build(tmp_path, "rsna", out_name="a", workers=1)
    b, qb, _ = build(tmp_path, "rsna", out_name="b", workers=3)
    for name in ("index.csv", "images.npy", "masks.npy", "boxes.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert qa.read_bytes() == qb.read_bytes()


def test_too_many_skips_fails_and_keeps_previous_cache(tmp_path):
    out_dir, _, _ = build(tmp_path, "rsna")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    with pytest.raises(DataError) as err:
        build(tmp_path, "rsna", max_skip=0.3)  # 2 of 5 unreadable
    assert "img/gone.png" in str(err.value) and "img/trunc.png" in str(err.value)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

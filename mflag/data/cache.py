"""The preprocessed image cache: square uint8 arrays, masks and boxes in one shared geometry.

Layout and schemas are fixed by ``docs/contracts.md`` ("Cache", "Data quality"). Every image
is read by a worker process, its longest side resized to S and zero-padded to S x S, centred;
masks and boxes go through the same map ``cache_xy = orig_xy * scale + offset``. The cache is built
in a temporary folder beside ``out_dir`` and swapped in only once everything succeeded.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from mflag.data.images import read_image_uint8
from mflag.data.split import SPLIT_COLUMNS, write_split_csv
from mflag.data.table import OUTSIDE_ROOT, DataError, DatasetTable, escapes_root

DATASETS = ("mimic", "chexpert", "rsna", "siim", "covidx", "objcxr", "nih")
MASK_DATASETS = ("rsna", "siim")  # rsna: union of filled boxes; siim: decoded RLE
BOX_DATASETS = ("rsna", "objcxr")
MISSING_FILE = "missing file"
NO_BOX_INSIDE = "no box inside the image"
_ROWS_PER_COPY = 256  # rows moved at a time when compacting an array after skips


def fit_square(
    img: np.ndarray, size: int, nearest: bool = False
) -> tuple[np.ndarray, float, float, float]:
    """Resize the longest side to ``size`` and zero-pad to ``size x size``, centred.

    Bilinear for images, ``nearest=True`` for 0/1 masks. Returns ``(out, scale, offset_x,
    offset_y)`` such that ``cache_xy = orig_xy * scale + offset`` (pixel-edge coordinates).
    """
    if img.ndim != 2:
        raise ValueError(f"fit_square expects a 2-D array, got shape {img.shape}")
    h, w = img.shape
    if h == 0 or w == 0:
        raise ValueError(f"fit_square got an empty image of shape {img.shape}")
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).resize((new_w, new_h), resample))
    ox, oy = (size - new_w) // 2, (size - new_h) // 2
    out = np.zeros((size, size), dtype=np.uint8)
    out[oy : oy + new_h, ox : ox + new_w] = small
    return out, scale, float(ox), float(oy)


def boxes_inside(
    boxes: Sequence[tuple[float, float, float, float]], width: int, height: int
) -> tuple[list[tuple[float, float, float, float]], list[tuple[float, float, float, float]]]:
    """Split original-pixel boxes into ``(kept, lost)``: those with some area inside the image
    ``[0, width] x [0, height]``, as given (``map_boxes`` clips them), and those with none (wholly
    outside the image, or of zero width or height)."""
    kept, lost = [], []
    for box in boxes:
        x1, y1, x2, y2 = (float(v) for v in box)
        if min(x2, width) > max(x1, 0.0) and min(y2, height) > max(y1, 0.0):
            kept.append((x1, y1, x2, y2))
        else:
            lost.append((x1, y1, x2, y2))
    return kept, lost


def map_boxes(
    boxes: Sequence[tuple[float, float, float, float]], scale: float, ox: float, oy: float, size: int
) -> list[tuple[float, float, float, float]]:
    """Original-pixel boxes (x1, y1, x2, y2) -> cache pixels, clipped to the square."""
    out = []
    for x1, y1, x2, y2 in boxes:
        c = (x1 * scale + ox, y1 * scale + oy, x2 * scale + ox, y2 * scale + oy)
        out.append(tuple(min(max(float(v), 0.0), float(size)) for v in c))
    return out


def fill_boxes(boxes: Sequence[tuple[float, float, float, float]], size: int) -> np.ndarray:
    """uint8 0/1 mask, the union of the filled boxes (cache pixels).

    A pixel is inside when its centre is; a box with positive extent fills at least one pixel.
    """
    mask = np.zeros((size, size), dtype=np.uint8)
    for x1, y1, x2, y2 in boxes:
        if x2 <= x1 or y2 <= y1:
            continue
        c0, c1 = _pixel_span(x1, x2, size)
        r0, r1 = _pixel_span(y1, y2, size)
        mask[r0:r1, c0:c1] = 1
    return mask


def _pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    start = min(max(math.ceil(lo - 0.5), 0), size - 1)
    stop = min(max(math.ceil(hi - 0.5), start + 1), size)
    return start, stop


def _process(task: tuple, root: Path, size: int, dataset: str):
    """One image -> (image, mask | None, cache boxes, lost boxes, skip reason). Runs in a worker process.

    Lost boxes are the image's boxes with no area inside it, in original pixels, with the image's size.
    """
    rel, boxes, rles = task
    # Checked before the file is looked at, so the report never tells missing from unreadable here.
    if escapes_root(root, rel):
        return None, None, [], [], OUTSIDE_ROOT
    full = root / rel
    if not full.is_file():
        return None, None, [], [], MISSING_FILE
    try:
        img = read_image_uint8(full)
        kept, lost = boxes_inside(boxes, img.shape[1], img.shape[0])
        lost = [(b, img.shape[1], img.shape[0]) for b in lost]
        if boxes and not kept:
            # Skip, label untouched: kept, it is a positive with an empty mask and no box; relabelled, a false 0.
            return None, None, [], lost, NO_BOX_INSIDE
        out, scale, ox, oy = fit_square(img, size)
        cache_boxes = map_boxes(kept, scale, ox, oy, size)
        mask = None
        if dataset == "rsna":
            mask = fill_boxes(cache_boxes, size)
        elif dataset == "siim":
            # Imported here, not at the top: only preprocess@siim runs the SIIM code, and only its deps
            # name mflag/data/siim.py (tests/test_stage_deps.py checks imports against the deps).
            from mflag.data.siim import decode_masks

            # Decode at the original geometry, then resize like the image (nearest keeps 0/1).
            mask = fit_square(decode_masks(list(rles), *img.shape), size, nearest=True)[0]
    except (DataError, OSError) as e:
        # Name the file relative to the root so the report does not depend on where data lives.
        return None, None, [], [], (str(e) or type(e).__name__).replace(str(full), rel)
    return out, mask, cache_boxes, lost, ""


def _write_json_atomic(obj: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compact(path: Path, kept: int) -> None:
    """Rewrite the .npy at ``path`` keeping only its first ``kept`` rows."""
    full = np.load(path, mmap_mode="r")
    part = path.with_name(path.name + ".part")
    out = open_memmap(part, mode="w+", dtype=np.uint8, shape=(kept,) + full.shape[1:])
    for i in range(0, kept, _ROWS_PER_COPY):
        j = min(i + _ROWS_PER_COPY, kept)
        out[i:j] = full[i:j]
    out.flush()
    del out, full
    os.replace(part, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temps(out_dir: Path) -> list[str]:
    """Remove the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` folders that a killed run left beside
    ``out_dir`` (those whose pid is no longer alive; a live run's folders stay). Returns their names."""
    out_dir = Path(out_dir)
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
            pid = p.name.rsplit("-", 1)[1]
            if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
    return removed


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` (two renames; the old folder is restored on failure)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    had_old = out_dir.exists()
    if had_old:
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if had_old:
            os.replace(old, out_dir)
        raise
    if had_old:
        shutil.rmtree(old)


def _quality_report(
    dataset: str,
    table: DatasetTable,
    split: pd.DataFrame,
    skipped: list[tuple[str, str]],
    split_dropped: Sequence[tuple[str, str]],
    kept: int,
    boxes_dropped: Sequence[dict] = (),
) -> dict:
    # Entries the reader and the split stage dropped, once each (the split stage's dropped.csv
    # usually repeats the reader's), then what this stage could not read.
    dropped = list(dict.fromkeys([tuple(d) for d in table.dropped] + [tuple(d) for d in split_dropped]))
    excluded = {k: int(v) for k, v in table.excluded.items()}
    known = set(split["path"]) | {p for p, _ in dropped}
    outside = int((~table.rows["path"].astype(str).isin(known)).sum()) if len(table.rows) else 0
    if outside:
        excluded["outside_splits"] = excluded.get("outside_splits", 0) + outside
    return {
        "dataset": dataset,
        "counts": {
            "read": len(split),
            "kept": kept,
            "skipped": len(skipped),
            "excluded": excluded,
            "dropped_by_split": len(dropped),
        },
        "skipped": [{"path": p, "reason": r} for p, r in dropped + skipped],
        "boxes_dropped": list(boxes_dropped),
    }


def build_cache(
    table: DatasetTable,
    split: pd.DataFrame,
    root: Path,
    out_dir: Path,
    image_size: int,
    workers: int,
    max_skip_fraction: float,
    dataset: str,
    quality_path: Path,
    split_dropped: Sequence[tuple[str, str]] = (),
) -> dict:
    """Read every row of the split file frame and write ``out_dir`` (see docs/contracts.md "Cache").

    table: the reader's table (its boxes / RLEs / excluded counts / dropped rows).
    split: the split file frame; its row order is the cache order.
    workers: worker processes ('spawn' pool); 0 or 1 reads in this process.
    Writes the data-quality JSON at ``quality_path`` (also when the run fails). Raises DataError,
    leaving ``out_dir`` untouched, when the share of unreadable images exceeds
    ``max_skip_fraction``. Returns a summary of counts and throughput.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if list(split.columns[: len(SPLIT_COLUMNS)]) != list(SPLIT_COLUMNS):
        raise ValueError(f"split frame must start with columns {list(SPLIT_COLUMNS)}, got {list(split.columns)}")
    root, out_dir, size = Path(root), Path(out_dir), int(image_size)
    split = split.reset_index(drop=True)
    n = len(split)
    if n == 0:
        raise DataError(f"preprocess {dataset}: the split file has no rows")

    with_masks, with_boxes = dataset in MASK_DATASETS, dataset in BOX_DATASETS
    image_ids = split["image_id"].astype(str).tolist()
    tasks = [
        (
            str(p),
            tuple(tuple(b) for b in table.boxes.get(i, ())) if with_boxes else (),
            tuple(table.rles.get(i, ())) if dataset == "siim" else (),
        )
        for i, p in zip(image_ids, split["path"])
    ]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(out_dir)  # this run's own pid included: a folder of an earlier run with it
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    start = time.perf_counter()
    try:
        images = open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        masks = open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)) if with_masks else None
        box_rows: list[tuple[str, ...]] = []
        kept_rows: list[int] = []
        skipped: list[tuple[str, str]] = []
        boxes_dropped: list[dict] = []

        work = partial(_process, root=root, size=size, dataset=dataset)
        progress = tqdm(total=n, desc=f"preprocess {dataset}", unit="img", mininterval=1.0)
        pool = mp.get_context("spawn").Pool(min(workers, n)) if workers > 1 else None
        try:
            chunk = max(1, min(64, n // (8 * max(workers, 1))))
            results = pool.imap(work, tasks, chunksize=chunk) if pool else map(work, tasks)
            for row, (img, mask, cache_boxes, lost, reason) in enumerate(results):
                progress.update(1)
                boxes_dropped.extend(
                    {"image_id": image_ids[row], "path": tasks[row][0], "box": list(b),
                     "reason": f"no area inside the {w}x{h} image"}
                    for b, w, h in lost
                )  # fmt: skip
                if reason:
                    skipped.append((tasks[row][0], reason))
                    continue
                k = len(kept_rows)  # rows are written compacted: row k of the arrays is kept row k
                images[k] = img
                if masks is not None:
                    masks[k] = mask
                image_id = image_ids[row]
                box_rows.extend((image_id, *(f"{v:.3f}" for v in b)) for b in cache_boxes)
                kept_rows.append(row)
        finally:
            progress.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        images.flush()
        del images
        if masks is not None:
            masks.flush()
            del masks
        seconds = time.perf_counter() - start

        report = _quality_report(dataset, table, split, skipped, split_dropped, len(kept_rows), boxes_dropped)
        _write_json_atomic(report, quality_path)
        if len(skipped) / n > max_skip_fraction:
            first = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
            raise DataError(
                f"preprocess {dataset}: {len(skipped)} of {n} images unusable "
                f"({len(skipped) / n:.1%} > max_skip_fraction {max_skip_fraction:.1%}); "
                f"first: {first}; full list in {quality_path}"
            )

        if len(kept_rows) < n:
            for name in ("images.npy", "masks.npy") if with_masks else ("images.npy",):
                _compact(tmp / name, len(kept_rows))
        write_split_csv(split.iloc[kept_rows], tmp / "index.csv")
        if with_boxes:
            with open(tmp / "boxes.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(["image_id", "x1", "y1", "x2", "y2"])
                w.writerows(box_rows)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    counts = report["counts"]
    return {
        "dataset": dataset,
        "read": counts["read"],
        "kept": counts["kept"],
        "skipped": counts["skipped"],
        "excluded": sum(counts["excluded"].values()),
        "dropped_by_split": counts["dropped_by_split"],
        "stale_removed": stale,
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 2) if seconds > 0 else float("inf"),
    }

"""RSNA Pneumonia Detection Challenge (stage 2): ``stage_2_train_labels.csv`` + DICOMs.

One CSV row per box (``patientId,x,y,width,height,Target``); a negative image has one row with
empty box numbers. Images are ``stage_2_train_images/<patientId>.dcm``. There is no official split.
"""

from __future__ import annotations

import math
from pathlib import Path

from .table import (
    BAD_LABEL,
    DataError,
    DatasetTable,
    drop_if_outside,
    line_of,
    make_table,
    read_csv_strings,
)

LABELS_FILE = "stage_2_train_labels.csv"
IMAGE_DIR = "stage_2_train_images"


def _num(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def read_rsna(root: Path) -> DatasetTable:
    root = Path(root)
    csv_path = root / LABELS_FILE
    df = read_csv_strings(csv_path, ["patientId", "x", "y", "width", "height", "Target"])

    order: list[str] = []
    targets: dict[str, set[int]] = {}
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    bad: set[str] = set()
    cols = zip(df["patientId"], df["x"], df["y"], df["width"], df["height"], df["Target"])
    for i, (pid, x, y, w, h, target) in enumerate(cols):
        pid = pid.strip()
        if not pid:
            raise DataError(f"{csv_path}: line {line_of(i)}: empty patientId")
        if pid not in targets:
            order.append(pid)
            targets[pid] = set()
            boxes[pid] = []
        t = _num(target.strip())
        if t not in (0.0, 1.0):
            bad.add(pid)
            continue
        targets[pid].add(int(t))
        raw = [s.strip() for s in (x, y, w, h)]
        if t == 0.0:
            if any(raw):  # a negative row must not carry a box
                bad.add(pid)
            continue
        nums = [_num(s) for s in raw]
        if any(n is None for n in nums) or nums[2] <= 0 or nums[3] <= 0:
            bad.add(pid)
            continue
        bx, by, bw, bh = nums
        boxes[pid].append((bx, by, bx + bw, by + bh))

    records: list[dict] = []
    dropped: list[tuple[str, str]] = []
    out_boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for pid in order:
        path = f"{IMAGE_DIR}/{pid}.dcm"
        if drop_if_outside(root, path, dropped):
            continue
        if pid in bad or len(targets[pid]) != 1:
            dropped.append((path, BAD_LABEL))
            continue
        target = targets[pid].pop()
        records.append(
            {
                "image_id": pid,
                "patient_id": pid,
                "path": path,
                "official_split": "",
                "target": target,
            }
        )
        if target:
            out_boxes[pid] = boxes[pid]
    return make_table(
        records,
        ["target"],
        int_labels=["target"],
        source=str(csv_path),
        dropped=dropped,
        boxes=out_boxes,
        sources={"": csv_path},
    )

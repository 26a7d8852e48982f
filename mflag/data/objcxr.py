"""Object-CXR (JF Healthcare, MIDL 2020): ``train.csv`` / ``dev.csv`` and ``train/``, ``dev/``.

``image_name,annotation``; the annotation is empty for an image without foreign objects, else
objects separated by ``;``, each ``type x1 y1 x2 y2 ...``: type 0 a rectangle and 1 an ellipse
(both given by two corners), 2 a polygon (its vertices). Every object becomes its bounding box.
``dev.csv`` is the official test set.
"""

from __future__ import annotations

from pathlib import Path

from .table import (
    BAD_LABEL,
    DUPLICATE_ROW,
    DataError,
    DatasetTable,
    drop_if_outside,
    line_of,
    make_table,
    read_csv_strings,
)

FILES = (("train.csv", "train", "train"), ("dev.csv", "dev", "test"))

Box = tuple[float, float, float, float]


def parse_annotation(annotation: str) -> list[Box]:
    """Boxes of an annotation string; ValueError when it is malformed."""
    boxes: list[Box] = []
    for part in annotation.split(";"):
        tokens = part.split()
        if not tokens:
            continue  # tolerate a trailing or doubled ';'
        kind = tokens[0]
        try:
            coords = [float(t) for t in tokens[1:]]
        except ValueError:
            raise ValueError(f"non-numeric coordinate in {part.strip()!r}") from None
        if kind in ("0", "1"):
            if len(coords) != 4:
                raise ValueError(f"shape {kind} needs 4 coordinates: {part.strip()!r}")
        elif kind == "2":
            if len(coords) < 4 or len(coords) % 2:
                raise ValueError(
                    f"polygon needs an even number (>= 4) of coordinates: {part.strip()!r}"
                )
        else:
            raise ValueError(f"unknown shape type {kind!r} in {part.strip()!r}")
        xs, ys = coords[0::2], coords[1::2]
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
    return boxes


def read_objcxr(root: Path) -> DatasetTable:
    root = Path(root)
    records: list[dict] = []
    dropped: list[tuple[str, str]] = []
    boxes: dict[str, list[Box]] = {}
    seen: set[str] = set()
    for csv_name, folder, split in FILES:
        csv_path = root / csv_name
        df = read_csv_strings(csv_path, ["image_name", "annotation"])
        for i, (name, ann) in enumerate(zip(df["image_name"], df["annotation"])):
            name = name.strip()
            if not name:
                raise DataError(f"{csv_path}: line {line_of(i)}: empty image_name")
            image_id = f"{folder}/{name}"
            if drop_if_outside(root, image_id, dropped):
                continue
            try:
                img_boxes = parse_annotation(ann)
            except ValueError:
                dropped.append((image_id, BAD_LABEL))
                continue
            if image_id in seen:
                dropped.append((image_id, DUPLICATE_ROW))
                continue
            seen.add(image_id)
            records.append(
                {
                    "image_id": image_id,
                    "patient_id": name,
                    "path": image_id,
                    "official_split": split,
                    "target": int(bool(img_boxes)),
                }
            )
            if img_boxes:
                boxes[image_id] = img_boxes
    return make_table(
        records,
        ["target"],
        int_labels=["target"],
        source=str(root),
        dropped=dropped,
        boxes=boxes,
        sources={split: root / csv_name for csv_name, _, split in FILES},
    )

"""SIIM-ACR Pneumothorax Segmentation (stage 1 layout).

``train-rle.csv`` has the header ``ImageId, EncodedPixels`` (note the space) and values with a
leading space (`` -1`` for an image without pneumothorax); several rows of one ImageId are OR-ed.
DICOMs lie at ``dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm``.

RLE format (stage 1): space-separated ``start length`` pairs, each start counted from the end of
the previous run (the first from 0), over the column-major (Fortran order) flattened image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .table import (
    BAD_LABEL,
    MISSING_FILE,
    UNREADABLE_FILE,
    DataError,
    DatasetTable,
    drop_if_outside,
    line_of,
    make_table,
    read_csv_strings,
)

RLE_FILE = "train-rle.csv"
DICOM_DIR = "dicom-images-train"
EMPTY_RLE = "-1"


def _rle_pairs(rle: str) -> list[tuple[int, int]]:
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"odd number of RLE values ({len(tokens)})")
    try:
        nums = [int(t) for t in tokens]
    except ValueError as e:
        raise ValueError(f"non-integer RLE value: {e}") from None
    pairs = list(zip(nums[0::2], nums[1::2]))
    for start, length in pairs:
        if start < 0 or length < 0:
            raise ValueError(f"bad RLE pair ({start}, {length})")
    return pairs


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode one stage-1 SIIM RLE string to a ``(height, width)`` uint8 0/1 mask."""
    flat = np.zeros(height * width, dtype=np.uint8)
    s = rle.strip()
    if s == EMPTY_RLE or s == "":
        return flat.reshape(height, width)
    try:
        pairs = _rle_pairs(s)
    except ValueError as e:
        raise DataError(f"malformed RLE: {e}") from None
    pos = 0
    for start, length in pairs:
        pos += start
        if pos + length > flat.size:
            raise DataError(
                f"RLE run ends at pixel {pos + length}, beyond a {height}x{width} image"
            )
        flat[pos : pos + length] = 1
        pos += length
    return flat.reshape((height, width), order="F")


def decode_masks(rles: Iterable[str], height: int, width: int) -> np.ndarray:
    """OR of several RLE strings (an empty iterable gives an empty mask)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for r in rles:
        mask |= rle_decode(r, height, width)
    return mask


def _patient_id(path: Path) -> str | None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    pid = str(ds.get("PatientID", "") or "").strip()
    return pid or None


def read_siim(root: Path) -> DatasetTable:
    root = Path(root)
    csv_path = root / RLE_FILE
    df = read_csv_strings(csv_path, ["ImageId", "EncodedPixels"])
    dicom_root = root / DICOM_DIR
    if not dicom_root.is_dir():
        raise DataError(f"required folder not found: {dicom_root}")

    order: list[str] = []
    rles: dict[str, list[str]] = {}
    bad: set[str] = set()
    for i, (image_id, enc) in enumerate(zip(df["ImageId"], df["EncodedPixels"])):
        image_id = image_id.strip()
        if not image_id:
            raise DataError(f"{csv_path}: line {line_of(i)}: empty ImageId")
        if image_id not in rles:
            order.append(image_id)
            rles[image_id] = []
        e = enc.strip()
        if e == EMPTY_RLE:
            continue
        try:
            if not e:
                raise ValueError("empty EncodedPixels")
            _rle_pairs(e)
        except ValueError:
            bad.add(image_id)
            continue
        rles[image_id].append(e)

    files: dict[str, Path] = {}
    not_in_csv = 0
    for p in sorted(dicom_root.glob("*/*/*.dcm")):
        if p.stem not in rles:
            not_in_csv += 1  # not part of the dataset (e.g. the stage-1 test images)
            continue
        if p.stem in files:
            raise DataError(
                f"{csv_path}: ImageId {p.stem!r} has two DICOMs: {files[p.stem]} and {p}"
            )
        files[p.stem] = p

    records: list[dict] = []
    dropped: list[tuple[str, str]] = []
    out_rles: dict[str, list[str]] = {}
    for image_id in order:
        p = files.get(image_id)
        if p is None:
            nominal = f"{DICOM_DIR}/{image_id}.dcm"
            if not drop_if_outside(root, nominal, dropped):
                dropped.append((nominal, MISSING_FILE))
            continue
        rel = p.relative_to(root).as_posix()
        # Before the header is read: a DICOM linked from outside the root is never opened.
        if drop_if_outside(root, rel, dropped):
            continue
        if image_id in bad:
            dropped.append((rel, BAD_LABEL))
            continue
        try:
            pid = _patient_id(p)
        except Exception:  # truncated / not a DICOM: the image is unusable
            dropped.append((rel, UNREADABLE_FILE))
            continue
        if pid is None:
            dropped.append((rel, "missing PatientID"))
            continue
        records.append(
            {
                "image_id": image_id,
                "patient_id": pid,
                "path": rel,
                "official_split": "",
                "target": int(bool(rles[image_id])),
            }
        )
        if rles[image_id]:
            out_rles[image_id] = rles[image_id]
    return make_table(
        records,
        ["target"],
        int_labels=["target"],
        source=str(csv_path),
        dropped=dropped,
        excluded={"not_in_csv": not_in_csv},
        rles=out_rles,
        sources={"": csv_path},
    )

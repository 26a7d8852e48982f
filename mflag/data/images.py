"""Read any image of the seven datasets (PNG / JPEG / DICOM) as a 2-D uint8 array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dicom import read_dicom_uint8
from .table import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")


def _minmax_uint8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def read_image_uint8(path: Path) -> np.ndarray:
    """PNG/JPEG via PIL (8-bit grey; 16-bit and float images min-max scaled), DICOM via pydicom."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom_uint8(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # force the full decode so truncated files fail here
            mode = im.mode
            if mode == "L":
                arr = np.array(im, dtype=np.uint8)
            elif mode in ("I", "F") or mode.startswith("I;16"):
                arr = _minmax_uint8(np.array(im))
            elif mode == "1":
                arr = np.array(im.convert("L"), dtype=np.uint8)
            else:  # RGB, RGBA, P, LA, CMYK, ...
                arr = np.array(im.convert("L"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: unreadable or truncated image: {e}") from e
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return arr

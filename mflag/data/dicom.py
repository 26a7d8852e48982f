"""DICOM to display-ready uint8: modality LUT, VOI LUT / window, MONOCHROME1 inverted.

Bright means dense in every output. Without a window or VOI LUT in the file the image is
min-max scaled over its own pixel values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .table import DataError

_PROBE = np.array([-1e30, 1e30], dtype=np.float64)
_PROBE_INT = np.array([-(2**31), 2**31 - 1], dtype=np.int64)


def _to_gray(arr: np.ndarray, ds) -> np.ndarray:
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples > 1 and arr.ndim == 3:
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return arr


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(hi - lo) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def dicom_to_uint8(ds, source: str = "<dataset>") -> np.ndarray:
    """The windowed 2-D uint8 image of an already read pydicom Dataset."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        raw = ds.pixel_array
    except Exception as e:  # truncated pixel data, missing decoder, no pixel data, ...
        raise DataError(f"{source}: cannot decode DICOM pixel data: {e}") from e
    try:
        raw = _to_gray(np.asarray(raw), ds)
        if raw.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {raw.shape}")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
            arr = raw.astype(np.float64)  # colour: already reduced to luminance
            lo, hi = float(arr.min()), float(arr.max())
        else:
            arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
            has_window = "WindowCenter" in ds and "WindowWidth" in ds
            has_lut = bool(ds.get("VOILUTSequence"))
            if has_window or has_lut:
                if has_lut:
                    # a VOI LUT indexes by integer value (pydicom warns on float input)
                    if np.all(np.isfinite(arr)) and np.array_equal(arr, np.round(arr)):
                        arr = arr.astype(np.int64)
                    probe = _PROBE_INT.copy()
                else:
                    probe = _PROBE.copy()
                with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                    arr = np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float64)
                    # The VOI output range: what the transform gives for extreme inputs,
                    # widened by the image itself in case a LUT is not monotonic.
                    probe = np.asarray(apply_voi_lut(probe, ds, index=0), dtype=np.float64)
                lo = float(min(probe.min(), arr.min()))
                hi = float(max(probe.max(), arr.max()))
            else:
                lo, hi = float(arr.min()), float(arr.max())
        out = _scale(arr, lo, hi)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{source}: cannot window DICOM image: {e}") from e
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def read_dicom_uint8(path: Path) -> np.ndarray:
    """Read a DICOM file to a 2-D uint8 array (DataError naming the file when unreadable)."""
    import pydicom

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise DataError(f"{path}: unreadable DICOM: {e}") from e
    return dicom_to_uint8(ds, str(path))

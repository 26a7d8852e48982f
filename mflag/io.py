"""Small file helpers shared by the stages: atomic writes, strict JSON with rounded floats."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

# Reported floats keep this many significant digits, so that last-bit differences in linear algebra
# (another BLAS path, another summation order) do not change a results file or its DVC hash.
SIGNIFICANT_DIGITS = 10


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex, read in 4 MiB blocks (weights and split files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def rounded(obj, digits: int = SIGNIFICANT_DIGITS):
    """`obj` with every finite float rounded to `digits` significant digits, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(rounded(v, digits) for v in obj)
    return obj


def _non_finite(obj, at: str = "") -> list[str]:
    """The key paths (``a.b[2]``) of the NaN and infinite floats in `obj`."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [at or "(the value)"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, f"{at}.{k}" if at else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, f"{at}[{i}]")]
    return []


def write_json(path: str | Path, obj) -> None:
    """`obj` as strict JSON (floats rounded by :func:`rounded`); a NaN or infinity raises ValueError naming its
    keys: a value that is undefined is written as null, with its reason, by the caller (docs/contracts.md)."""
    bad = _non_finite(obj)
    if bad:
        raise ValueError(f"{path}: NaN or infinite values are not JSON (write them as null with a reason): "
                         f"{', '.join(bad)}")  # fmt: skip
    atomic_write(path, json.dumps(rounded(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def open_live(folder: str | Path):
    """A DVCLive logger writing only its curve files into `folder` (dvc.yaml declares them as the stage's
    output and plots, so DVCLive neither writes a dvc.yaml nor makes an experiment of its own)."""
    from dvclive import Live  # imported here: most stages that use this module log no curves

    return Live(str(folder), dvcyaml=False, save_dvc_exp=False, report=None)

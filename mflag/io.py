"""Small file helpers shared by the stages: atomic writes."""

from __future__ import annotations

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


def rounded(obj, digits: int = SIGNIFICANT_DIGITS):
    """`obj` with every finite float rounded to `digits` significant digits, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(rounded(v, digits) for v in obj)
    return obj


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def open_live(folder: str | Path):
    """A DVCLive logger writing only its curve files into `folder` (dvc.yaml declares them as the stage's
    output and plots, so DVCLive neither writes a dvc.yaml nor makes an experiment of its own)."""
    from dvclive import Live  # imported here: most stages that use this module log no curves

    return Live(str(folder), dvcyaml=False, save_dvc_exp=False, report=None)

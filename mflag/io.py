"""Small file helpers shared by the stages: atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def open_live(folder: str | Path):
    """A DVCLive logger writing only its curve files into `folder` (dvc.yaml declares them as the stage's
    output and plots, so DVCLive neither writes a dvc.yaml nor makes an experiment of its own)."""
    from dvclive import Live  # imported here: most stages that use this module log no curves

    return Live(str(folder), dvcyaml=False, save_dvc_exp=False, report=None)

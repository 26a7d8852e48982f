"""Shared types and CSV helpers of the dataset readers.

Every reader returns a :class:`DatasetTable`: one row per image with the columns
``image_id, patient_id, path, official_split`` followed by the dataset's label columns
(see ``docs/contracts.md``). Bad input raises :class:`DataError` whose message names
the file, and the column or row where that applies.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

BASE_COLUMNS = ("image_id", "patient_id", "path", "official_split")
OFFICIAL_SPLITS = ("train", "valid", "test", "")

# Reasons used in ``DatasetTable.dropped`` (kept as constants so callers can group by them).
BAD_LABEL = "bad label"
EMPTY_REPORT = "empty report"
MISSING_REPORT = "missing report"
MISSING_FILE = "missing file"
UNREADABLE_FILE = "unreadable file"
DUPLICATE_ROW = "duplicate row"
OUTSIDE_ROOT = "path outside the dataset root"


class DataError(Exception):
    """Bad input; the message names the file, column or row."""


@dataclass
class DatasetTable:
    """What a reader found under a dataset root.

    rows: one row per image: ``image_id, patient_id, path`` (relative to the root, posix),
        ``official_split`` ('train' | 'valid' | 'test' | ''), then the label columns.
    dropped: ``(path, reason)`` of rows dropped for a bad label, an empty report, ...
    excluded: counts excluded by protocol, e.g. ``{"lateral": 123}``.
    boxes: image_id -> [(x1, y1, x2, y2)] in original pixel coordinates (rsna, objcxr).
    rles: image_id -> its EncodedPixels strings, '-1' omitted (siim).
    sources: official split ('train' | 'valid' | 'test' | '' for the pool) -> the file its rows come from.
    """

    rows: pd.DataFrame
    dropped: list[tuple[str, str]] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    rles: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def line_of(index: int) -> int:
    """1-based line number in a headed CSV of the data row at 0-based position ``index``."""
    return index + 2


def escapes_root(root: Path, rel: str) -> bool:
    """Whether ``rel``, a path read from a data file, leads outside the dataset ``root``.

    Decided on the text alone, before the file system is asked anything: an absolute path, ``..`` steps
    that climb above the root, or a NUL byte escape. The answer never depends on whether a file exists, so
    no report tells which files exist outside the root. Symbolic links inside the root are followed: they
    are the user's own layout (image folders on another disk, DVC's ``cache.type: symlink``), not something
    a data file can create. Every reader calls this.
    """
    rel = str(rel)
    norm = posixpath.normpath(rel.replace(os.sep, "/"))
    return "\0" in rel or os.path.isabs(rel) or norm == ".." or norm.startswith("../")


def drop_if_outside(root: Path, rel: str, dropped: list[tuple[str, str]]) -> bool:
    """True, with ``(rel, OUTSIDE_ROOT)`` added to ``dropped``, when ``rel`` escapes ``root``."""
    if escapes_root(root, rel):
        dropped.append((rel, OUTSIDE_ROOT))
        return True
    return False


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"required file not found: {path}")
    return path


def read_csv_strings(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a headed CSV (plain or gzipped) with every cell as a str ('' for blanks).

    Column names are matched after stripping surrounding spaces (the SIIM file has a header
    `ImageId, EncodedPixels`); the returned frame uses the stripped names. A missing column
    raises DataError naming the column and the file.
    """
    require_file(path)
    try:
        df = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            compression="infer",
            skip_blank_lines=True,
        )
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: file is empty (no header)") from e
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: cannot parse CSV: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)}; "
            f"found {list(df.columns)}"
        )
    return df


def make_table(
    records: Iterable[dict],
    label_columns: Sequence[str],
    int_labels: Sequence[str] = (),
    *,
    source: str = "",
    dropped: list[tuple[str, str]] | None = None,
    excluded: dict[str, int] | None = None,
    boxes: dict | None = None,
    rles: dict | None = None,
    sources: dict[str, str] | None = None,
) -> DatasetTable:
    """Build the sorted table; duplicate image_ids are a DataError naming ``source``."""
    columns = list(BASE_COLUMNS) + list(label_columns)
    df = pd.DataFrame(list(records), columns=columns)
    for c in BASE_COLUMNS:
        df[c] = df[c].astype(str)
    for c in label_columns:
        df[c] = df[c].astype("int64") if c in int_labels else df[c].astype(str)
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise DataError(f"{source}: image_id {dup.iloc[0]!r} appears more than once")
    bad = set(df["official_split"]) - set(OFFICIAL_SPLITS)
    if bad:
        raise DataError(f"{source}: unknown official split value(s) {sorted(bad)}")
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    return DatasetTable(
        rows=df,
        dropped=sorted(dropped or []),
        excluded={k: int(v) for k, v in sorted((excluded or {}).items()) if v},
        boxes=boxes or {},
        rles=rles or {},
        sources={k: str(v) for k, v in (sources or {}).items()},
    )


def write_dropped_csv(dropped: Sequence[tuple[str, str]], path: Path) -> None:
    """Write ``path, reason`` rows (the split stage's ``<dataset>.dropped.csv``), atomically."""
    from mflag.io import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    w.writerows(dropped)
    atomic_write(path, buf.getvalue())


def read_dropped_csv(path: Path) -> list[tuple[str, str]]:
    """The rows of a ``<dataset>.dropped.csv``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [(r[0], r[1]) for r in rows[1:] if r]

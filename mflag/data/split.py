"""Patient-level train/valid/test splits and nested 1/10/100 % train subsets.

Every decision is a function of ``seed`` and the ids alone (SHA-256 of a tagged string), never of
row order, pandas/numpy versions or RNG streams, so the same files give the same split file on
any machine. The file's schema is fixed by ``docs/contracts.md`` ("Split file").
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from mflag.data.table import DataError, DatasetTable

SPLITS = ("train", "valid", "test")
SPLIT_COLUMNS = ("image_id", "patient_id", "path", "split", "pct")
_INPUT_COLUMNS = ("image_id", "patient_id", "path", "official_split")
_ID_COLUMNS = ("image_id", "patient_id", "path", "split")


@dataclass(frozen=True)
class SplitSpec:
    valid_fraction: float  # share of pool patients to valid; ignored where an official valid split exists
    test_fraction: float  # share of pool patients to test; ignored where an official test split exists
    fractions: tuple[int, ...] = (1, 10, 100)  # percent of train rows, nested
    label_columns: tuple[str, ...] = ()  # stratify the nesting; a str column counts each value as a label

    def __post_init__(self) -> None:
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"SplitSpec.{name} must be in [0, 1), got {value}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError("SplitSpec.valid_fraction + test_fraction must be < 1")
        f = self.fractions
        if (
            not f
            or any(not isinstance(x, int) or isinstance(x, bool) for x in f)
            or list(f) != sorted(set(f))
            or f[0] <= 0
            or f[-1] != 100
        ):
            raise ValueError(f"SplitSpec.fractions must be increasing ints in (0, 100] ending in 100, got {f}")


def _digest(seed: int, tag: str, key: str) -> bytes:
    return hashlib.sha256(f"{seed}/{tag}/{key}".encode("utf-8")).digest()


def _unit(seed: int, tag: str, key: str) -> float:
    """Uniform in [0, 1): the first 8 bytes of the digest as an integer / 2**64."""
    return int.from_bytes(_digest(seed, tag, key)[:8], "big") / 2.0**64


def _label_masks(train: pd.DataFrame, label_columns: tuple[str, ...]) -> list[tuple[str, pd.Series]]:
    """(name, positive-row mask) per stratification label, in the spec's order.

    A numeric (or bool) column is binary: positive means == 1. Any other column is categorical: each
    distinct non-empty value, in sorted order, is one label whose positives are the rows holding it.
    """
    out = []
    for col in label_columns:
        values = train[col]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            out.append((col, values == 1))
        else:
            strings = values.astype(str).where(values.notna(), "")
            for value in sorted(set(strings) - {""}):
                out.append((f"{col}={value}", strings == value))
    return out


def _nested_pct(train: pd.DataFrame, spec: SplitSpec, seed: int) -> pd.Series:
    """pct of each train row: the smallest fraction whose patient subset holds it."""
    n_rows = len(train)
    if n_rows == 0:
        return pd.Series(pd.NA, index=train.index, dtype="Int64")
    patients = train["patient_id"]
    rows_of = patients.value_counts(sort=False).to_dict()
    # Patients in hash order; the full digest, ties (never in practice) by id.
    order = sorted(rows_of, key=lambda p: (_digest(seed, "fraction", p), p))
    rank = {p: i for i, p in enumerate(order)}
    # Per label: its positive patients, lowest v first.
    label_patients = [
        sorted(set(patients[mask]), key=rank.__getitem__)
        for _, mask in _label_masks(train, spec.label_columns)
    ]

    chosen: dict[str, int] = {}  # patient -> fraction it entered at
    held = 0  # rows in the subset
    cursor = 0
    for f in spec.fractions:
        target = -(-f * n_rows // 100)  # ceil(f/100 * n_rows) in exact integers
        # Stratify first: every label positive in train gets a positive patient in every subset.
        for positives in label_patients:
            if positives and not any(p in chosen for p in positives):
                chosen[positives[0]] = f
                held += rows_of[positives[0]]
        while held < target:
            p = order[cursor]
            cursor += 1
            if p not in chosen:
                chosen[p] = f
                held += rows_of[p]
    return patients.map(chosen).astype("Int64")


def assign_splits(
    rows: pd.DataFrame, spec: SplitSpec, seed: int
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Split a reader's rows by patient and nest the train fractions.

    rows: ``image_id, patient_id, path, official_split`` then label columns (a reader's table).
    Returns the split file frame (``image_id, patient_id, path, split, pct``, then the label
    columns; sorted by split then image_id) and ``(path, reason)`` for rows dropped because their
    patient also belongs to an official split (the official sets stay exactly as published).
    """
    missing = [c for c in _INPUT_COLUMNS if c not in rows.columns]
    if missing:
        raise DataError(f"split input: missing column(s) {missing}; found {list(rows.columns)}")
    missing = [c for c in spec.label_columns if c not in rows.columns]
    if missing:
        raise DataError(f"split input: label column(s) {missing} not in {list(rows.columns)}")
    label_columns = [c for c in rows.columns if c not in _INPUT_COLUMNS]

    df = rows.reset_index(drop=True).copy()
    for c in _INPUT_COLUMNS:
        df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    bad = sorted(set(df["official_split"]) - {"train", "valid", "test", ""})
    if bad:
        raise DataError(f"split input: unknown official_split value(s) {bad}")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise DataError(f"split input: image_id {dup.iloc[0]!r} appears more than once")
    if (df["patient_id"] == "").any():
        first = df.loc[df["patient_id"] == "", "path"].iloc[0]
        raise DataError(f"split input: empty patient_id for {first!r}")

    official = df["official_split"]
    test_patients = set(df.loc[official == "test", "patient_id"])
    valid_patients = set(df.loc[official == "valid", "patient_id"])
    test_fraction = 0.0 if test_patients else spec.test_fraction
    valid_fraction = 0.0 if valid_patients else spec.valid_fraction

    # A patient found in an official set loses its rows elsewhere; a patient in both official
    # sets keeps only its test rows (the test set is never altered).
    reason = pd.Series("", index=df.index)
    in_test = df["patient_id"].isin(test_patients)
    in_valid = df["patient_id"].isin(valid_patients)
    reason[(official != "test") & in_test] = "patient also in official test"
    reason[(official.isin(["train", ""])) & ~in_test & in_valid] = "patient also in official valid"
    drop = reason != ""
    dropped = sorted(zip(df.loc[drop, "path"], reason[drop]))
    df = df[~drop].copy()

    split = df["official_split"].copy()
    pool = split.isin(["train", ""])
    cut = {}
    for p in set(df.loc[pool, "patient_id"]):
        u = _unit(seed, "split", p)
        cut[p] = "test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction else "train"
    split[pool] = df.loc[pool, "patient_id"].map(cut)
    df["split"] = split

    df["pct"] = pd.Series(pd.NA, index=df.index, dtype="Int64")
    train = df["split"] == "train"
    df.loc[train, "pct"] = _nested_pct(df[train], spec, seed)

    return order_split_frame(df, label_columns), dropped


def order_split_frame(df: pd.DataFrame, label_columns: Sequence[str]) -> pd.DataFrame:
    """The split file's columns, rows sorted by split (train, valid, test) then image_id, then path.

    Sorted with Python's own string order: no dependence on pandas' sort implementation.
    """
    rank = {s: i for i, s in enumerate(SPLITS)}
    keys = list(zip(df["split"].map(rank), df["image_id"], df["path"], range(len(df))))
    order = [k[-1] for k in sorted(keys)]
    return df.iloc[order][list(SPLIT_COLUMNS) + list(label_columns)].reset_index(drop=True)


def _tally(table: DatasetTable) -> str:
    """What the reader left out, over the whole dataset: 'excluded lateral 12; dropped bad label 1'."""
    parts = []
    if table.excluded:
        parts.append("excluded " + ", ".join(f"{k} {v}" for k, v in sorted(table.excluded.items())))
    reasons = Counter(r for _, r in table.dropped)
    if reasons:
        parts.append("dropped " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    return "; ".join(parts) if parts else "no data row at all"


def _why_empty(name: str, table: DatasetTable, split_dropped: Sequence[tuple[str, str]], spec: SplitSpec,
               dataset: str) -> str:  # fmt: skip
    """Why the split ``name`` holds no row, naming the file it comes from."""
    official = table.rows["official_split"].astype(str)
    own_file = name in table.sources and name != "train"  # an official valid / test set
    pool_file = table.sources.get("train") or table.sources.get("", "the dataset's files")
    file = table.sources[name] if own_file else pool_file
    feeds = official == name if own_file else official.isin(["train", ""])
    paths = set(table.rows.loc[feeds, "path"])
    if not paths:
        which = f"the official {name} set" if own_file else "the train pool"
        return f"nothing is left of {file} ({which}): the reader kept none of its rows (whole dataset: {_tally(table)})"
    lost = Counter(r for p, r in split_dropped if p in paths)
    if sum(lost.values()) == len(paths):
        why = ", ".join(f"{r} {n}" for r, n in sorted(lost.items()))
        return f"all {len(paths)} rows the reader kept from {file} were dropped by the split ({why})"
    patients = table.rows.loc[feeds & ~table.rows["path"].isin([p for p, _ in split_dropped]), "patient_id"].nunique()
    if name == "train":
        return (f"all {patients} train-pool patients of {file} went to valid or test (data.{dataset}.valid_fraction "
                f"{spec.valid_fraction} + test_fraction {spec.test_fraction}; too few patients)")  # fmt: skip
    key = f"data.{dataset}.{name}_fraction"
    fraction = getattr(spec, f"{name}_fraction")
    if fraction == 0:
        return f"{dataset} has no official {name} set and {key} is 0"
    return f"{key} {fraction} put none of the {patients} train-pool patients of {file} into {name} (too few patients)"


def check_splits_not_empty(split: pd.DataFrame, table: DatasetTable, split_dropped: Sequence[tuple[str, str]],
                           spec: SplitSpec, dataset: str) -> None:  # fmt: skip
    """DataError saying, for each of train, valid and test that came out empty, the file it comes from
    and why nothing of it is left. ``split`` is :func:`assign_splits`' frame, ``split_dropped`` its list."""
    held = set(split["split"])
    empty = [name for name in SPLITS if name not in held]
    if empty:
        lines = "\n".join(f"  {name}: {_why_empty(name, table, split_dropped, spec, dataset)}" for name in empty)
        names = " and ".join(filter(None, [", ".join(empty[:-1]), empty[-1]]))
        raise DataError(f"the {names} split{'s are' if len(empty) > 1 else ' is'} empty; "
                        f"no split file written:\n{lines}")  # fmt: skip


def _write_atomic(write, path: Path) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_split_csv(df: pd.DataFrame, path: Path) -> None:
    """Write a split-file frame (also used for a cache's ``index.csv``) atomically.

    ``pct`` is written as an integer, or empty for valid/test rows.
    """
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"split frame lacks column(s) {missing}")
    out = df.copy()
    pct = pd.to_numeric(out["pct"], errors="raise")
    if (pct.dropna() % 1 != 0).any():
        raise ValueError("split frame: pct must hold whole numbers")
    out["pct"] = pct.astype("Int64")
    _write_atomic(lambda f: out.to_csv(f, index=False, na_rep="", lineterminator="\n"), path)


def read_split_csv(path: Path) -> pd.DataFrame:
    """Read a split file (or a cache's ``index.csv``): ids as str, ``pct`` as nullable Int64."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    df = pd.read_csv(
        path,
        dtype={c: str for c in _ID_COLUMNS},
        keep_default_na=False,
        na_values={"pct": [""]},
    )
    if list(df.columns[: len(SPLIT_COLUMNS)]) != list(SPLIT_COLUMNS):
        raise DataError(f"{path}: columns must start with {list(SPLIT_COLUMNS)}, found {list(df.columns)}")
    df["pct"] = df["pct"].astype("Int64")
    return df


"""A dataset's train/valid/test assignment and 1/10 % train subsets taken from MGCA's split files.

MGCA (Wang et al., NeurIPS 2022; github.com/HKU-MedAI/MGCA) is the downstream protocol the M-FLAG paper used.
With ``data.<dataset>.split_source: mgca`` the split stage reads MGCA's files from ``data/mgca_splits/<dataset>/``
(named as MGCA names them) instead of drawing its own split. The formats, MGCA's sampling rule and every
decision below are in docs/design.md, "MGCA split files"; the record written beside the split file in
docs/contracts.md.

In short: a row's ``split`` is the MGCA file it is listed in (a row listed in several: test > valid > train);
``pct`` is 1 or 10 where MGCA's ``DataFrame.sample(frac=p / 100, random_state=42)`` of the train file (in file
order, after its Frontal filter for CheXpert) holds it, else 100. Those samples nest (one permutation, cut
short), so ``pct <= p`` is exactly the p % subset. Rows of the dataset in no MGCA file are dropped with a reason;
an MGCA entry that names no image of the dataset is an error naming the file and line.
"""

from __future__ import annotations

import importlib
import json
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from mflag.data.split import SPLIT_COLUMNS, SPLITS, _write_atomic, order_split_frame
from mflag.data.table import DataError, DatasetTable, line_of, read_csv_strings
from mflag.io import file_sha256

MGCA_ROOT = Path("data/mgca_splits")  # <dataset>/ under it: a dep of split@<dataset> (dvc.yaml)
SEED = 42  # MGCA's random_state in every DataFrame.sample call of mgca/datasets/classification_dataset.py
SUBSET_PCTS = (1, 10)  # MGCA's data_pct 0.01 and 0.1; 1.0 (100 %) is the whole train file, unsampled
NOT_IN_MGCA = "not in MGCA split files"
PRECEDENCE = ("test", "valid", "train")  # a row in several files takes the first of these


@dataclass(frozen=True)
class FileSet:
    """One set of MGCA files for a dataset: (file name, split) in train, valid, test order."""

    files: tuple[tuple[str, str], ...]
    kind: str  # "csv" or "pkl" (a pickle of [filenames array, boxes array], read with numpy classes only)
    column: str  # the id column of a CSV ('' for a pickle)
    exact_subsets: bool  # MGCA draws its subsets from these files with a rule that can be recomputed


def _files(train: str, valid: str, test: str) -> tuple[tuple[str, str], ...]:
    return ((train, "train"), (valid, "valid"), (test, "test"))


# Names and columns: mgca/constants.py and mgca/datasets/*.py of HKU-MedAI/MGCA (docs/design.md).
FILE_SETS: dict[str, tuple[FileSet, ...]] = {
    "chexpert": (FileSet(_files("train_split.csv", "valid_split.csv", "valid.csv"), "csv", "Path", True),),
    "rsna": (
        FileSet(_files("train.csv", "val.csv", "test.csv"), "csv", "patientId", True),  # classification
        FileSet(_files("train.pkl", "val.pkl", "test.pkl"), "pkl", "", False),  # detection / segmentation
    ),
    "siim": (FileSet(_files("train.csv", "valid.csv", "test.csv"), "csv", "ImageId", False),),
    "covidx": (FileSet(_files("train.csv", "valid.csv", "test.csv"), "csv", "filename", True),),
    "objcxr": (FileSet(_files("train.pkl", "valid.pkl", "test.pkl"), "pkl", "", False),),
}
SUPPORTED = tuple(FILE_SETS)
CHEXPERT_VIEW_COL = "Frontal/Lateral"  # MGCA keeps the rows whose value is exactly "Frontal", in every split


# ------------------------------------------------------------------------------------------ ids
def _entry_key(dataset: str, value: str, split: str) -> str:
    """The match key of an MGCA entry (see _table_key), built the way MGCA turns the entry into a file."""
    value = value.strip()
    if dataset == "chexpert":  # MGCA: os.path.join(CHEXPERT_DATA_DIR, "/".join(x.split("/")[1:]))
        return "/".join(value.replace("\\", "/").split("/")[1:])
    if dataset in ("rsna", "siim"):  # patientId / ImageId; the pickles hold "<patientId>.dcm"
        return value[: -len(".dcm")] if value.endswith(".dcm") else value
    if dataset == "covidx":  # MGCA: train/{x} for train.csv and valid.csv, test/{x} for test.csv
        return f"{'test' if split == 'test' else 'train'}/{value}"
    if dataset == "objcxr":  # MGCA: train/ for train.pkl and valid.pkl, dev/ for test.pkl
        return f"{'dev' if split == 'test' else 'train'}/{value}"
    raise KeyError(dataset)


def _table_key(dataset: str, image_id: str) -> str:
    """The match key of a reader row: its image_id, less the CheXpert folder name (small or full copy)."""
    return image_id.split("/", 1)[1] if dataset == "chexpert" else image_id


def _dropped_key(dataset: str, path: str) -> str:
    """The match key of a row the reader dropped, from its path."""
    if dataset in ("rsna", "siim"):
        return PurePosixPath(path).stem  # <patientId>.dcm / <ImageId>.dcm
    return _table_key(dataset, path) if dataset == "chexpert" and "/" in path else path


# --------------------------------------------------------------------------------------- files
class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and scalars and Python builtins' data; any other global is refused, so a
    pickle cannot run code on load (the pattern of Python's pickle docs, "Restricting Globals")."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy arrays)")
        if module == "numpy":
            return getattr(importlib.import_module("numpy"), name)
        try:  # numpy 2 moved numpy.core to numpy._core; pickles of numpy 1 name the old module
            return getattr(importlib.import_module("numpy._core.multiarray"), name)
        except ImportError:
            return getattr(importlib.import_module("numpy.core.multiarray"), name)


def read_pickle_filenames(path: Path) -> list[str]:
    """The file names of an MGCA detection pickle: ``[filenames, boxes]`` as written by
    mgca/preprocess/rsna.py ``prepare_detection_pkl`` and object_cxr.py ``save_pkl``."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnly(f).load()
    except Exception as e:  # noqa: BLE001 - any failure of a foreign file is a DataError naming it
        raise DataError(f"{path}: cannot read as an MGCA pickle ([filenames, boxes] numpy arrays): {e}") from e
    if not isinstance(obj, (list, tuple)) or len(obj) != 2:
        raise DataError(f"{path}: expected [filenames, boxes] (MGCA's detection pickle), got {type(obj).__name__}")
    names = obj[0]
    if getattr(names, "ndim", None) != 1 or not all(isinstance(n, str) for n in names.tolist()):
        raise DataError(f"{path}: the first element must be a 1-D array of file names")
    return [str(n) for n in names.tolist()]


@dataclass
class _Entry:
    key: str
    where: str  # "<file>: line N" / "<file>: entry N", for messages


def _read_entries(dataset: str, fs: FileSet, path: Path, split: str) -> tuple[list[_Entry], int]:
    """The entries MGCA uses from one file, in file order, and how many it filters out (CheXpert laterals)."""
    if fs.kind == "pkl":
        names = read_pickle_filenames(path)
        return [_Entry(_entry_key(dataset, n, split), f"{path}: entry {i}") for i, n in enumerate(names)], 0
    required = [fs.column] + ([CHEXPERT_VIEW_COL] if dataset == "chexpert" else [])
    df = read_csv_strings(path, required)
    keep = df[CHEXPERT_VIEW_COL] == "Frontal" if dataset == "chexpert" else pd.Series(True, index=df.index)
    entries = []
    for i, value in zip(df.index[keep], df.loc[keep, fs.column]):
        if not value.strip():
            raise DataError(f"{path}: line {line_of(i)}: empty {fs.column}")
        entries.append(_Entry(_entry_key(dataset, value, split), f"{path}: line {line_of(i)}"))
    return entries, int((~keep).sum())


def mgca_sample(n_rows: int, pct: int) -> list[int]:
    """Positions (in file order) of MGCA's ``pct`` % sample of an ``n_rows``-row train file:
    ``DataFrame.sample(frac=pct / 100, random_state=42)``, the call of mgca/datasets/classification_dataset.py."""
    return pd.DataFrame({"i": range(n_rows)}).sample(frac=pct / 100, random_state=SEED)["i"].tolist()


def find_file_set(dataset: str, folder: Path) -> FileSet:
    """The one MGCA file set present in ``folder``; a DataError naming what is missing otherwise."""
    sets = FILE_SETS[dataset]
    present = [fs for fs in sets if any((folder / name).exists() for name, _ in fs.files)]
    want = " or ".join(", ".join(name for name, _ in fs.files) for fs in sets)
    if not present:
        raise DataError(f"data.{dataset}.split_source is mgca, but {folder}/ holds none of MGCA's split files "
                        f"({want}); put them there (docs/design.md, \"MGCA split files\") or set it to "
                        "own")  # fmt: skip
    if len(present) > 1:
        raise DataError(f"{folder}/ holds files of two MGCA sets ({want}): the pipeline has one {dataset} split; "
                        "keep one set")  # fmt: skip
    (fs,) = present
    missing = [str(folder / name) for name, _ in fs.files if not (folder / name).is_file()]
    if missing:
        raise DataError(f"MGCA split file(s) not found: {', '.join(missing)} (data.{dataset}.split_source is mgca; "
                        f"the set is {', '.join(name for name, _ in fs.files)})")  # fmt: skip
    return fs


# --------------------------------------------------------------------------------------- split
def assign_from_mgca(
    dataset: str, table: DatasetTable, folder: Path, root: str = ""
) -> tuple[pd.DataFrame, list[tuple[str, str]], dict]:
    """The split file frame, the rows dropped by it (``(path, reason)``) and the source record.

    ``table`` is the dataset's reader table (read from ``root``); ``folder`` holds MGCA's files for ``dataset``.
    """
    if dataset not in FILE_SETS:
        raise DataError(f"MGCA publishes no downstream split for {dataset}; data.{dataset}.split_source must be own")
    folder = Path(folder)
    fs = find_file_set(dataset, folder)

    rows = table.rows.reset_index(drop=True)
    row_of = {_table_key(dataset, i): n for n, i in enumerate(rows["image_id"].astype(str))}
    reader_dropped = {_dropped_key(dataset, p): r for p, r in table.dropped}

    split_of: dict[str, str] = {}  # key -> split (precedence applied)
    listed_in: dict[str, list[str]] = {}  # key -> the splits of the files that list it
    files, counts = [], Counter()
    train_entries: list[_Entry] = []
    for name, split in fs.files:
        path = folder / name
        entries, filtered = _read_entries(dataset, fs, path, split)
        matched = 0
        for e in entries:
            if e.key in row_of:
                matched += 1
            elif e.key in reader_dropped:
                counts[f"listed by MGCA, dropped by the reader ({reader_dropped[e.key]})"] += 1
            else:
                raise DataError(f"{e.where}: {e.key!r} is not an image of the {dataset} dataset at "
                                f"{root or 'data.' + dataset + '.root'} (is this the release MGCA's files were "
                                "made from?)")  # fmt: skip
            if split not in listed_in.setdefault(e.key, []):
                listed_in[e.key].append(split)
        if split == "train":
            train_entries = entries
        if filtered:
            counts["not frontal (MGCA keeps Frontal/Lateral == Frontal)"] += filtered
        files.append({"path": path.as_posix(), "split": split, "sha256": file_sha256(path),
                      "entries": len(entries) + filtered, "used": len(entries), "matched": matched})  # fmt: skip
    for key, splits in listed_in.items():
        split_of[key] = next(s for s in PRECEDENCE if s in splits)
        if len(splits) > 1:
            counts["listed in " + " and ".join(s for s in SPLITS if s in splits) + f": kept in {split_of[key]}"] += 1

    # MGCA's subsets: positions among the train file's rows it uses (SIIM: among its distinct ImageIds, the unit
    # MGCA samples there; that draw itself cannot be recomputed, see FileSet.exact_subsets).
    units = [e.key for e in train_entries]
    if not fs.exact_subsets:
        units = list(dict.fromkeys(units))
    samples = {p: {units[i] for i in mgca_sample(len(units), p)} for p in SUBSET_PCTS}
    for small, big in zip(SUBSET_PCTS, SUBSET_PCTS[1:]):
        if not samples[small] <= samples[big]:  # never with pandas' sample (a prefix of one permutation)
            raise DataError(f"MGCA's {small} % sample of {folder / fs.files[0][0]} is not inside its {big} % sample: "
                            "the split file's single pct column cannot hold both (docs/design.md)")  # fmt: skip

    df = rows.copy()
    keys = [_table_key(dataset, i) for i in df["image_id"].astype(str)]
    df["split"] = [split_of.get(k, "") for k in keys]
    pct = [next((p for p in SUBSET_PCTS if k in samples[p]), 100) if s == "train" else pd.NA
           for k, s in zip(keys, df["split"])]  # fmt: skip
    df["pct"] = pd.array(pct, dtype="Int64")
    absent = df["split"] == ""
    dropped = sorted((p, NOT_IN_MGCA) for p in df.loc[absent, "path"])
    if absent.any():
        counts[NOT_IN_MGCA] = int(absent.sum())
    df = df[~absent]
    for c in ("image_id", "patient_id", "path"):
        df[c] = df[c].astype(str)
    label_columns = [c for c in rows.columns if c not in ("image_id", "patient_id", "path", "official_split")]
    out = order_split_frame(df, label_columns)

    empty = [s for s in SPLITS if not (out["split"] == s).any()]
    if empty:
        lines = "\n".join(f"  {s}: {folder / n}: none of its entries is a row of the dataset that the reader kept"
                          for n, s in fs.files if s in empty)  # fmt: skip
        raise DataError(f"the {' and '.join(empty)} split(s) would be empty; no split file written:\n{lines}")

    train = out[out["split"] == "train"]
    patients = out.groupby("patient_id")["split"].nunique()
    record = {
        "dataset": dataset,
        "split_source": "mgca",
        "folder": folder.as_posix(),
        "files": files,
        "subsets": {
            "rule": "pandas.DataFrame.sample(frac=pct/100, random_state=42) of the train file's rows in file order"
                    + (" (Frontal only)" if dataset == "chexpert" else "")
                    + (" (its distinct ImageIds)" if dataset == "siim" else ""),
            "as_mgca": fs.exact_subsets,
            "sampled_from": len(units),
            "sampled": {str(p): len(samples[p]) for p in SUBSET_PCTS},
            "rows": {str(p): int((train["pct"] <= p).sum()) for p in (*SUBSET_PCTS, 100)},
        },
        "rows": {s: int((out["split"] == s).sum()) for s in SPLITS},
        "patients_in_two_splits": int((patients > 1).sum()),
        "not_used": dict(sorted(counts.items())),
    }
    return out[list(SPLIT_COLUMNS) + label_columns], dropped, record


def own_record(dataset: str, seed: int, valid_fraction: float, test_fraction: float) -> dict:
    """The source record of the pipeline's own split (mflag/data/split.py)."""
    return {"dataset": dataset, "split_source": "own", "rule": "mflag/data/split.py (patient-level, SHA-256 of seed "
            "and ids)", "seed": seed, "valid_fraction": valid_fraction, "test_fraction": test_fraction}  # fmt: skip


def write_source_record(record: dict, path: Path) -> None:
    """``data/splits/<dataset>.source.json``, written atomically."""
    _write_atomic(lambda f: f.write(json.dumps(record, indent=2, sort_keys=False) + "\n"), path)


def stray_files(dataset: str, folder: Path) -> list[str]:
    """MGCA files in ``folder`` while the dataset's split is the pipeline's own (for a note)."""
    names = {name for fs in FILE_SETS.get(dataset, ()) for name, _ in fs.files}
    return sorted(n for n in names if (Path(folder) / n).exists())

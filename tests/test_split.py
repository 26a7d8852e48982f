"""Patient-level splits and nested fractions, checked against the rules in docs/contracts.md."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mflag.data.split import SplitSpec, assign_splits, read_split_csv, write_split_csv

SEED = 7
LABELS = ("common", "rare", "finding")


def make_rows(n_patients: int = 400, official_test_every: int = 0, seed: int = 0) -> pd.DataFrame:
    """Synthetic reader rows: 1-4 images a patient, a common and a rare 0/1 label, a categorical one."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        pid = f"pat{p:05d}"
        official = "test" if official_test_every and p % official_test_every == 0 else ""
        for k in range(int(rng.integers(1, 5))):
            records.append(
                {
                    "image_id": f"{pid}_{k}.png",
                    "patient_id": pid,
                    "path": f"images/{pid}_{k}.png",
                    "official_split": official,
                    "common": int(rng.random() < 0.3),
                    "rare": 0,
                    "finding": "normal" if rng.random() < 0.8 else "pneumonia",
                }
            )
    df = pd.DataFrame(records)
    # A handful of rare positives, and a rare category, spread over a few patients.
    for i in (37, 411, 802):
        df.loc[i % len(df), "rare"] = 1
    df.loc[[523 % len(df), 911 % len(df)], "finding"] = "COVID-19"
    return df


def spec(valid: float = 0.1, test: float = 0.2) -> SplitSpec:
    return SplitSpec(valid_fraction=valid, test_fraction=test, label_columns=LABELS)


def unit(tag: str, pid: str, seed: int = SEED) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}/{tag}/{pid}".encode()).digest()[:8], "big") / 2**64


def subset(out: pd.DataFrame, f: int) -> set[str]:
    train = out[out["split"] == "train"]
    return set(train.loc[train["pct"] <= f, "image_id"])


def positives(df: pd.DataFrame) -> set[str]:
    labels = {c for c in ("common", "rare") if (df[c] == 1).any()}
    return labels | {f"finding={v}" for v in df["finding"]}


def test_schema_and_sort_order():
    rows = make_rows(official_test_every=5)
    out, _ = assign_splits(rows, spec(), SEED)
    assert list(out.columns) == ["image_id", "patient_id", "path", "split", "pct", *LABELS]
    rank = {"train": 0, "valid": 1, "test": 2}
    keys = list(zip(out["split"].map(rank), out["image_id"]))
    assert keys == sorted(keys)
    assert out["pct"].isna().tolist() == (out["split"] != "train").tolist()
    assert set(out.loc[out["split"] == "train", "pct"]) <= {1, 10, 100}


def test_hash_rule_and_no_patient_in_two_splits():
    rows = make_rows()
    out, dropped = assign_splits(rows, spec(valid=0.1, test=0.2), SEED)
    assert dropped == [] and len(out) == len(rows)
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()
    for pid, split in out.groupby("patient_id")["split"].first().items():
        u = unit("split", pid)
        assert split == ("test" if u < 0.2 else "valid" if u < 0.3 else "train"), pid


def test_fractions_nested_large_enough_and_stratified():
    rows = make_rows(official_test_every=5)
    out, _ = assign_splits(rows, spec(), SEED)
    train = out[out["split"] == "train"]
    s1, s10, s100 = subset(out, 1), subset(out, 10), subset(out, 100)
    assert s1 <= s10 <= s100 == set(train["image_id"])
    for f, s in ((1, s1), (10, s10)):
        assert len(s) >= math.ceil(f / 100 * len(train))
        # Whole patients only.
        assert set(train.loc[train["image_id"].isin(s), "patient_id"]) == set(
            train.loc[train["pct"] <= f, "patient_id"]
        )
        assert positives(train[train["image_id"].isin(s)]) == positives(train)
    # The rare label is positive somewhere in train for this seed (otherwise the test checks nothing).
    assert (train["rare"] == 1).any() and (train["finding"] == "COVID-19").any()
    # Not much larger than the target: at most one patient past it plus one per label.
    assert len(s1) < math.ceil(0.01 * len(train)) + 4 * (1 + 2 + 3)


def test_fill_follows_fraction_hash_order():
    rows = make_rows()
    rows["rare"] = 0
    rows["finding"] = "normal"
    rows["common"] = 1  # one label, present everywhere: no stratification detour
    out, _ = assign_splits(rows, spec(), SEED)
    train = out[out["split"] == "train"]
    per_patient = train.groupby("patient_id")["pct"].first()
    order = sorted(per_patient.index, key=lambda p: hashlib.sha256(f"{SEED}/fraction/{p}".encode()).digest())
    assert per_patient[order].is_monotonic_increasing


def test_shuffled_input_gives_identical_output(tmp_path):
    rows = make_rows(official_test_every=6)
    a, da = assign_splits(rows, spec(), SEED)
    b, db = assign_splits(rows.sample(frac=1.0, random_state=3).reset_index(drop=True), spec(), SEED)
    pd.testing.assert_frame_equal(a, b)
    assert da == db
    write_split_csv(a, tmp_path / "a.csv")
    write_split_csv(b, tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    c, _ = assign_splits(rows, spec(), SEED + 1)
    assert not a["split"].equals(c["split"])


def test_second_process_gives_identical_bytes(tmp_path):
    rows = make_rows(official_test_every=6)
    out, _ = assign_splits(rows, spec(), SEED)
    write_split_csv(out, tmp_path / "here.csv")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from test_split import make_rows, spec, SEED;"
        "from mflag.data.split import assign_splits, write_split_csv;"
        "out, _ = assign_splits(make_rows(official_test_every=6), spec(), SEED);"
        "write_split_csv(out, sys.argv[2])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "there.csv")],
        check=True,
        cwd=root,
        env=env,
    )
    assert (tmp_path / "here.csv").read_bytes() == (tmp_path / "there.csv").read_bytes()


def test_official_test_untouched_and_overlapping_patient_dropped():
    rows = make_rows(official_test_every=4)
    # A pool row of an official-test patient: it must be dropped and reported.
    extra = rows[rows["official_split"] == "test"].iloc[[0]].copy()
    extra["image_id"], extra["path"], extra["official_split"] = "extra.png", "images/extra.png", "train"
    rows = pd.concat([rows, extra], ignore_index=True)
    out, dropped = assign_splits(rows, spec(valid=0.1, test=0.3), SEED)
    official = rows[rows["official_split"] == "test"]
    assert set(out.loc[out["split"] == "test", "image_id"]) == set(official["image_id"])
    assert dropped == [("images/extra.png", "patient also in official test")]
    assert "extra.png" not in set(out["image_id"])
    # The pool's test_fraction is ignored when an official test set exists.
    pool = out[~out["image_id"].isin(official["image_id"])]
    assert set(pool["split"]) == {"train", "valid"}
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()


def test_official_valid_and_test_kept_as_published():
    rows = make_rows()
    rows["official_split"] = np.array(["train", "valid", "test"])[[hash_bucket(p) for p in rows["patient_id"]]]
    out, dropped = assign_splits(rows, SplitSpec(0.0, 0.0, label_columns=LABELS), SEED)
    assert dropped == []
    merged = out.merge(rows[["image_id", "official_split"]], on="image_id")
    assert (merged["split"] == merged["official_split"]).all()


def hash_bucket(pid: str) -> int:
    return int(pid[3:]) % 3


def test_pool_patient_in_official_valid_dropped():
    rows = make_rows(n_patients=50)
    first = rows["patient_id"] == rows["patient_id"].iloc[0]
    rows.loc[first, "official_split"] = "valid"
    rows.loc[first.idxmax(), "official_split"] = "train"
    out, dropped = assign_splits(rows, SplitSpec(0.0, 0.0, label_columns=LABELS), SEED)
    assert dropped == [(rows.loc[first.idxmax(), "path"], "patient also in official valid")]
    assert set(out.loc[out["patient_id"] == rows["patient_id"].iloc[0], "split"]) == {"valid"}


def test_rsna_style_proportions():
    rows = make_rows(n_patients=2000)
    out, _ = assign_splits(rows, SplitSpec(0.2, 0.2, label_columns=("common",)), SEED)
    share = out.groupby("patient_id")["split"].first().value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.6, abs=0.03)
    assert share["valid"] == pytest.approx(0.2, abs=0.03)
    assert share["test"] == pytest.approx(0.2, abs=0.03)


def test_csv_roundtrip(tmp_path):
    out, _ = assign_splits(make_rows(official_test_every=5), spec(), SEED)
    path = tmp_path / "splits" / "x.csv"
    write_split_csv(out, path)
    assert os.listdir(path.parent) == ["x.csv"]  # no temp file left behind
    lines = path.read_text().splitlines()
    assert lines[0] == "image_id,patient_id,path,split,pct,common,rare,finding"
    pct_cells = {line.split(",")[4] for line in lines[1:]}
    assert pct_cells == {"1", "10", "100", ""}
    pd.testing.assert_frame_equal(read_split_csv(path), out)


def test_bad_spec_and_bad_input():
    with pytest.raises(ValueError):
        SplitSpec(0.5, 0.6)
    with pytest.raises(ValueError):
        SplitSpec(0.1, 0.1, fractions=(10, 1, 100))
    from mflag.data.table import DataError

    rows = make_rows(n_patients=5)
    rows.loc[0, "official_split"] = "validate"
    with pytest.raises(DataError, match="validate"):
        assign_splits(rows, spec(), SEED)

"""Splits taken from MGCA's split files (data.<dataset>.split_source: mgca; mflag/data/mgca.py): the test writes
MGCA-format files for a small synthetic corpus itself, runs the split stage from them and one fine-tune cell on
the result. Each row's split is the file it is listed in, the 1 %/10 % subsets are MGCA's pandas sample (computed
here independently), the source record names the files with their SHA-256, and bad input stops the stage."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from mflag.data.chexpert import read_chexpert
from mflag.data.mgca import FILE_SETS, NOT_IN_MGCA, assign_from_mgca, mgca_sample
from mflag.data.objcxr import read_objcxr
from mflag.data.table import DataError
from mflag.params import MGCA_SPLIT_DATASETS, ParamsError, load
from tests.conftest import REPO, TINY_SYNTHETIC, deep_merge, params_with, repo_params_dict, run_stage
from tests.test_finetune_stage import TINY_FINETUNE

RSNA_PATIENTS = 100  # MGCA's train file then holds 60 rows: a 1 % sample of 1 row, a 10 % sample of 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mflag.synth.corpus import generate

    out = tmp_path_factory.mktemp("mgca_corpus")
    synthetic = deep_merge(TINY_SYNTHETIC, {"rsna": {"patients": RSNA_PATIENTS}})
    generate(params_with({"synthetic": synthetic}).synthetic, out, datasets=("rsna", "chexpert", "objcxr"),
             progress=False)  # fmt: skip
    return out


def _rsna_ids(corpus) -> list[str]:
    ids = list(dict.fromkeys(pd.read_csv(corpus / "rsna/stage_2_train_labels.csv", dtype=str)["patientId"]))
    random.Random(7).shuffle(ids)
    return ids


def _write_rsna_files(folder, ids: list[str]) -> dict[str, list[str]]:
    """MGCA's RSNA classification files (mgca/preprocess/rsna.py: patientId, bbox, Target; index=False); 10 of the
    dataset's images are in none of them."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train.csv": ids[:60], "val.csv": ids[60:75], "test.csv": ids[75:90]}
    for name, part in parts.items():
        pd.DataFrame({"patientId": part, "bbox": "", "Target": 0}).to_csv(folder / name, index=False)
    return parts


@pytest.fixture(scope="module")
def workdir(corpus, tmp_path_factory):
    wd = tmp_path_factory.mktemp("mgca_stages")
    data = {"image_size": 40, "workers": 1, "rsna": {"root": str(corpus / "rsna"), "split_source": "mgca"}}
    params = deep_merge(repo_params_dict(), {"data": data, "finetune": TINY_FINETUNE})
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _write_rsna_files(wd / "data/mgca_splits/rsna", _rsna_ids(corpus))
    run_stage(wd, sys.executable, str(REPO / "stages/split.py"), "rsna")
    return wd


def test_each_row_is_in_the_split_of_its_file_and_the_subsets_are_mgcas_sample(workdir, corpus):
    folder = workdir / "data/mgca_splits/rsna"
    split = pd.read_csv(workdir / "data/splits/rsna.csv", dtype={"image_id": str}, keep_default_na=False)
    for name, want in (("train.csv", "train"), ("val.csv", "valid"), ("test.csv", "test")):
        listed = set(pd.read_csv(folder / name, dtype=str)["patientId"])
        assert set(split.loc[split["split"] == want, "image_id"]) == listed, name
    # MGCA: RSNAImageDataset reads train.csv and keeps self.df.sample(frac=data_pct, random_state=42)
    train_csv = pd.read_csv(folder / "train.csv")
    pct = pd.to_numeric(split["pct"], errors="coerce")
    for p in (1, 10):
        want = set(train_csv.sample(frac=p / 100, random_state=42)["patientId"])
        assert set(split.loc[(split["split"] == "train") & (pct <= p), "image_id"]) == want, p
    assert split.loc[split["split"] == "train", "pct"].astype(int).isin([1, 10, 100]).all()
    # the dataset's images in no MGCA file are dropped, with the reason
    dropped = pd.read_csv(workdir / "data/splits/rsna.dropped.csv")
    left_out = _rsna_ids(corpus)[90:]
    assert sorted(dropped.loc[dropped["reason"] == NOT_IN_MGCA, "path"]) == sorted(
        f"stage_2_train_images/{i}.dcm" for i in left_out)  # fmt: skip
    record = json.loads((workdir / "data/splits/rsna.source.json").read_text())
    assert record["split_source"] == "mgca" and record["subsets"]["as_mgca"] is True
    files = {f["split"]: f for f in record["files"]}
    for name, s in (("train.csv", "train"), ("val.csv", "valid"), ("test.csv", "test")):
        assert files[s]["path"] == f"data/mgca_splits/rsna/{name}"
        assert files[s]["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert record["rows"] == {"train": 60, "valid": 15, "test": 15}


def test_a_cell_runs_on_the_mgca_split(workdir):
    split = pd.read_csv(workdir / "data/splits/rsna.csv", dtype={"image_id": str}, keep_default_na=False)
    pct = pd.to_numeric(split["pct"], errors="coerce")
    train10 = split[(split["split"] == "train") & (pct <= 10)]
    assert train10["target"].nunique() == 2  # the corpus and the file order give the 10 % sample both classes
    run_stage(workdir, sys.executable, str(REPO / "stages/preprocess.py"), "rsna")
    run_stage(workdir, sys.executable, str(REPO / "stages/init_random.py"))
    run_stage(workdir, sys.executable, str(REPO / "stages/finetune.py"), "cls_rsna", "random", "10")
    out = json.loads((workdir / "reports/finetune/cls_rsna-10-random/metrics.json").read_text())
    assert out["n_train"] == len(train10) and out["test_cases"] == 15


def _split_fails(wd) -> str:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(REPO / "stages/split.py"), "rsna"], cwd=wd, capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not (wd / "data/splits").exists()  # nothing written
    return proc.stderr


@pytest.fixture
def scratch(workdir, tmp_path):
    """A fresh working folder with the workdir's params and MGCA files, no outputs."""
    wd = tmp_path / "wd"
    shutil.copytree(workdir / "data/mgca_splits", wd / "data/mgca_splits")
    shutil.copy(workdir / "params.yaml", wd / "params.yaml")
    return wd


def test_an_mgca_row_not_in_the_dataset_names_file_and_line(scratch):
    path = scratch / "data/mgca_splits/rsna/train.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[2, "patientId"] = "not-a-patient"
    df.to_csv(path, index=False)
    err = _split_fails(scratch)
    assert f"{path.relative_to(scratch)}: line 4: 'not-a-patient' is not an image of the rsna dataset" in err


def test_a_missing_mgca_file_is_named(scratch):
    (scratch / "data/mgca_splits/rsna/val.csv").unlink()
    assert "MGCA split file(s) not found: data/mgca_splits/rsna/val.csv" in _split_fails(scratch)


def test_no_mgca_file_at_all_says_where_they_go(scratch):
    for f in (scratch / "data/mgca_splits/rsna").glob("*.csv"):
        f.unlink()
    err = _split_fails(scratch)
    assert "data.rsna.split_source is mgca, but data/mgca_splits/rsna/ holds none of MGCA's split files" in err


@pytest.mark.parametrize("dataset", ["mimic", "nih"])
def test_mgca_source_for_a_dataset_without_mgca_splits_is_refused_at_load(tmp_path, dataset):
    params = repo_params_dict()
    if dataset not in params["data"]:
        pytest.skip(f"no data.{dataset} in params.yaml")
    params["data"][dataset]["split_source"] = "mgca"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ParamsError, match=rf"`data\.{dataset}\.split_source` is mgca, but MGCA publishes no"):
        load(tmp_path / "params.yaml")


def test_every_split_entry_has_its_mgca_folder_and_the_params_know_the_datasets():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["split"]
    assert "data/mgca_splits/${key}" in stage["do"]["deps"]
    for key in stage["foreach"]:  # DVC refuses a missing dep: every dataset's folder is in Git (a README)
        assert (REPO / "data/mgca_splits" / key / "README.md").is_file(), key
    assert tuple(FILE_SETS) == MGCA_SPLIT_DATASETS


def test_mgca_samples_nest():
    """pandas' sample is RandomState(42).choice(n, k, replace=False), a prefix of one permutation: 1 % in 10 %."""
    for n in (1, 7, 49, 50, 151, 1000, 4321):
        small, big = set(mgca_sample(n, 1)), set(mgca_sample(n, 10))
        assert small <= big and len(big) == round(n / 10)


def test_chexpert_frontal_filter_first_folder_and_overlap(corpus, tmp_path):
    """CheXpert as MGCA writes it: paths under CheXpert-v1.0/ (the full release) match the small copy; lateral rows
    are MGCA-filtered; rows listed in both train_split and valid_split (MGCA's drop-by-label) stay in valid."""
    root = corpus / "chexpert"
    (ddir,) = root.iterdir()
    full = pd.read_csv(ddir / "train.csv", dtype=str, keep_default_na=False)
    full["Path"] = full["Path"].str.replace(ddir.name, "CheXpert-v1.0", regex=False)
    folder = tmp_path / "chexpert"
    folder.mkdir()
    full.to_csv(folder / "train_split.csv")  # MGCA writes these two with the index column
    frontal = full[full["Frontal/Lateral"] == "Frontal"]
    frontal.iloc[:3].to_csv(folder / "valid_split.csv")  # also in train_split.csv
    shutil.copy(ddir / "valid.csv", folder / "valid.csv")
    split, dropped, record = assign_from_mgca("chexpert", read_chexpert(root), folder)
    overlap = set(frontal["Path"].iloc[:3].str.replace("CheXpert-v1.0", ddir.name, regex=False))
    assert set(split.loc[split["split"] == "valid", "image_id"]) == overlap
    assert record["not_used"]["listed in train and valid: kept in valid"] == 3
    assert record["not_used"]["not frontal (MGCA keeps Frontal/Lateral == Frontal)"] > 0
    # the subsets are drawn over the Frontal rows of train_split.csv, in file order, overlap included
    for p in (1, 10):
        sample = set(frontal.sample(frac=p / 100, random_state=42)["Path"].str.replace("CheXpert-v1.0", ddir.name))
        got = set(split.loc[(split["split"] == "train") & (split["pct"] <= p), "image_id"])
        assert got == sample - overlap
    assert (split["split"] == "test").sum() == (pd.read_csv(ddir / "valid.csv")["Frontal/Lateral"] == "Frontal").sum()
    assert dropped == []


def _objcxr_pickles(folder, names_by_file):
    folder.mkdir(parents=True, exist_ok=True)
    for name, names in names_by_file.items():
        boxes = np.array([np.zeros((1, 4)) for _ in names] + [None], dtype=object)[:-1]  # MGCA's ragged object array
        with open(folder / name, "wb") as f:
            pickle.dump([np.array(names), boxes], f)


def test_objcxr_pickles_are_read_with_numpy_classes_only(corpus, tmp_path):
    root = corpus / "objcxr"
    train = list(pd.read_csv(root / "train.csv", dtype=str)["image_name"])
    dev = list(pd.read_csv(root / "dev.csv", dtype=str)["image_name"])
    folder = tmp_path / "objcxr"
    _objcxr_pickles(folder, {"train.pkl": train[:-3], "valid.pkl": train[-3:], "test.pkl": dev})
    split, dropped, record = assign_from_mgca("objcxr", read_objcxr(root), folder)
    assert set(split.loc[split["split"] == "valid", "image_id"]) == {f"train/{n}" for n in train[-3:]}
    assert set(split.loc[split["split"] == "test", "image_id"]) == {f"dev/{n}" for n in dev}
    assert record["subsets"]["as_mgca"] is False and dropped == []

    class Boom:  # a pickle that would run a command on load
        def __reduce__(self):
            return (subprocess.call, (["touch", str(tmp_path / "pwned")],))

    with open(folder / "valid.pkl", "wb") as f:
        pickle.dump([np.array(train[-3:]), Boom()], f)
    with pytest.raises(DataError, match=r"valid\.pkl: cannot read as an MGCA pickle.*not allowed"):
        assign_from_mgca("objcxr", read_objcxr(root), folder)
    assert not (tmp_path / "pwned").exists()

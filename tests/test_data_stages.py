"""The split and preprocess stages, run as DVC runs them, on the tiny synthetic corpus."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import DATASETS, REPO, deep_merge, repo_params_dict


@pytest.fixture(scope="module")
def workdir(stage_workdir):
    return stage_workdir


@pytest.mark.parametrize("ds", DATASETS)
def test_split_file_contract(workdir, ds):
    split = pd.read_csv(workdir / "data/splits" / f"{ds}.csv", dtype={"image_id": str, "patient_id": str})
    assert list(split.columns[:5]) == ["image_id", "patient_id", "path", "split", "pct"]
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    assert set(split["split"]) <= {"train", "valid", "test"}
    train = split[split["split"] == "train"]
    assert train["pct"].isin([1, 10, 100]).all() and split[split["split"] != "train"]["pct"].isna().all()
    assert split["image_id"].is_unique
    if ds == "chexpert":  # the official valid.csv is the test set
        assert split[split["split"] == "test"]["path"].str.contains("/valid/").all()
    if ds in ("mimic", "chexpert"):  # frontal only
        assert not split["path"].str.contains("lateral").any()


@pytest.mark.parametrize("ds", DATASETS)
def test_cache_contract(workdir, ds):
    index = pd.read_csv(workdir / "data/cache" / ds / "index.csv", dtype={"image_id": str, "patient_id": str})
    split = pd.read_csv(workdir / "data/splits" / f"{ds}.csv", dtype={"image_id": str, "patient_id": str})
    images = np.load(workdir / "data/cache" / ds / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (len(index), 40, 40)
    assert list(index.columns) == list(split.columns) and set(index["image_id"]) == set(split["image_id"])
    assert (images.reshape(len(index), -1).max(axis=1) > 100).all()  # every image has content
    quality = json.loads((workdir / "reports/data_quality" / f"{ds}.json").read_text())
    assert quality["counts"]["kept"] == len(index) and quality["skipped"] == []
    if ds in ("rsna", "siim"):
        masks = np.load(workdir / "data/cache" / ds / "masks.npy", mmap_mode="r")
        assert masks.shape == images.shape and set(np.unique(masks)) <= {0, 1}
        positive = index["target"].to_numpy() == 1
        assert (masks.reshape(len(index), -1).max(axis=1) == positive).all()
    if ds in ("rsna", "objcxr"):
        boxes = pd.read_csv(workdir / "data/cache" / ds / "boxes.csv", dtype={"image_id": str})
        assert list(boxes.columns) == ["image_id", "x1", "y1", "x2", "y2"]
        assert ((boxes.x1 >= 0) & (boxes.x2 <= 40) & (boxes.x1 < boxes.x2) & (boxes.y1 < boxes.y2)).all()
        assert set(boxes.image_id) == set(index.loc[index["target"] == 1, "image_id"])


def test_mimic_text_is_impression_then_findings(workdir, tiny_corpus):
    split = pd.read_csv(workdir / "data/splits/mimic.csv", dtype=str)
    assert (split["text"].str.len() > 10).all()
    assert not split["text"].str.contains("FINAL REPORT|INDICATION|EXAMINATION").any()


def test_covidx_labels_match_the_lists(workdir, tiny_corpus):
    split = pd.read_csv(workdir / "data/splits/covidx.csv", dtype=str)
    lists = pd.concat(
        [
            pd.read_csv(tiny_corpus / "covidx" / f"{p}_COVIDx9A.txt", sep=" ", header=None, dtype=str).assign(part=p)
            for p in ("train", "test")
        ]
    )
    expected = dict(zip(lists["part"] + "/" + lists[1], lists[2]))
    assert dict(zip(split["image_id"], split["label"])) == expected


def test_missing_root_fails_with_the_file_named(tmp_path):
    params = deep_merge(repo_params_dict(), {"data": {"rsna": {"root": str(tmp_path / "nowhere")}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([sys.executable, str(REPO / "stages/split.py"), "rsna"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "stage_2_train_labels.csv" in proc.stderr and "Traceback" not in proc.stderr

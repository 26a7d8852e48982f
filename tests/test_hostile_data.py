"""Hostile and broken inputs, each written by hand in the dataset's real layout.

Paths that leave the dataset root, boxes outside their image, splits that come out empty and the
leftovers of a killed preprocess run: every case ends in a dropped-row entry, a data-quality entry or
a message that names the dataset and the file, never silently and never in a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mflag.data.cache import build_cache
from mflag.data.chexpert import read_chexpert
from mflag.data.covidx import read_covidx
from mflag.data.mimic import read_mimic
from mflag.data.objcxr import read_objcxr
from mflag.data.rsna import read_rsna
from mflag.data.siim import read_siim
from mflag.data.split import SplitSpec, assign_splits, check_splits_not_empty, read_split_csv
from mflag.data.table import DataError, DatasetTable, escapes_root
from tests.conftest import REPO, deep_merge, repo_params_dict

OUTSIDE = "path outside the dataset root"  # docs/contracts.md, "Data quality"
S = 50  # cache side in the box tests


# --------------------------------------------------------------------------- hand-made files


def png(path: Path, h: int = 8, w: int = 8, value: int = 200) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, np.uint8)).save(path, format="PNG")
    return path


def dicom(path: Path, patient_id: str = "p", h: int = 8, w: int = 8) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient_id, "CR"
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(h * w) % 251).astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def place(tmp_path):
    """(root, elsewhere): a dataset root, and a folder beside it holding a file that must stay unread."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    png(elsewhere / "secret.png")
    (elsewhere / "secret.jpg").write_bytes((elsewhere / "secret.png").read_bytes())
    (elsewhere / "notadicom.dcm").write_text("not a DICOM")
    return root, elsewhere


def link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)


def outside_paths(table) -> list[str]:
    return sorted(p for p, r in table.dropped if r == OUTSIDE)


# --------------------------------------------------------------------------- the shared check


@pytest.mark.parametrize(
    "rel, escapes",
    [
        ("a/b.png", False),
        ("a/../b.png", False),  # climbs, but stays inside
        ("a/../../b.png", True),
        ("../root/b.png", True),  # leaves, even if it comes back by name
        ("/etc/hostname", True),
        ("a/./b/../../c", False),
        ("link/x.png", False),  # through a symlinked folder: links are the user's own layout, followed
        ("inner/x.png", False),  # a symlink that stays inside
        ("a\0b", True),  # not a path at all
    ],
)
def test_escapes_root_by_hand(place, rel, escapes):
    root, elsewhere = place
    link(root / "link", elsewhere)
    (root / "real").mkdir()
    link(root / "inner", root / "real")
    assert escapes_root(root, rel) is escapes


# --------------------------------------------------------------------------- paths, reader by reader


def write_mimic(root: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    """rows: (dicom_id, subject, study, split, view); every study gets a report."""
    split = "dicom_id,study_id,subject_id,split\n" + "".join(f"{d},{st},{su},{sp}\n" for d, su, st, sp, _ in rows)
    meta = "dicom_id,subject_id,study_id,ViewPosition\n" + "".join(f"{d},{su},{st},{v}\n" for d, su, st, _, v in rows)
    (root / "mimic-cxr-2.0.0-split.csv").write_text(split)
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(meta)
    for _, su, st, _, _ in rows:
        report = root / "files" / f"p{su[:2]}" / f"p{su}" / f"s{st}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("FINAL REPORT\n IMPRESSION: No acute process.\n")


def test_mimic_dicom_id_climbing_out_is_dropped(place):
    root, elsewhere = place
    climb = "../../../../../elsewhere/secret"  # files/p10/p10000032/s50000001/ + 5 x '..' = the root's parent
    write_mimic(root, [("good", "10000032", "50000001", "train", "PA"),
                       (climb, "10000032", "50000001", "train", "PA"),
                       ("../../../../../elsewhere/nothing", "10000032", "50000001", "train", "PA")])  # fmt: skip
    t = read_mimic(root)
    assert t.rows["image_id"].tolist() == ["good"]
    assert outside_paths(t) == sorted(f"files/p10/p10000032/s50000001/{c}.jpg" for c in (climb, climb[:-6] + "nothing"))


def test_mimic_symlinked_image_and_report_are_followed(place):
    """A link inside the root is the user's layout (a disk elsewhere, DVC's symlink cache): followed."""
    root, elsewhere = place
    write_mimic(root, [("a", "10000032", "50000001", "train", "PA"), ("b", "11000011", "51000001", "train", "PA")])
    link(root / "files/p10/p10000032/s50000001/a.jpg", elsewhere / "secret.jpg")
    report = root / "files/p11/p11000011/s51000001.txt"
    report.unlink()
    (elsewhere / "report.txt").write_text("IMPRESSION: a report from elsewhere.\n")
    link(report, elsewhere / "report.txt")
    t = read_mimic(root)
    assert t.rows["image_id"].tolist() == ["a", "b"] and outside_paths(t) == []
    assert t.rows["text"].tolist() == ["No acute process.", "a report from elsewhere."]


CHEX_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion\n"


def chex_row(path: str, view: str = "Frontal") -> str:
    return f"{path},Female,60,{view},AP,1.0,,0.0,,\n"


def write_chexpert(root: Path, train: list[str], valid: list[str]) -> Path:
    d = root / "CheXpert-v1.0-small"
    d.mkdir(parents=True)
    (d / "train.csv").write_text(CHEX_HEADER + "".join(train))
    (d / "valid.csv").write_text(CHEX_HEADER + "".join(valid))
    return d


def test_chexpert_absolute_path_is_dropped_whether_or_not_it_exists(place):
    root, elsewhere = place
    there = elsewhere / "patient00009/study1/view1_frontal.jpg"
    png(there)
    good = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    write_chexpert(root, [chex_row(good), chex_row(str(there)), chex_row(str(there).replace("00009", "00008"))], [])
    t = read_chexpert(root)
    assert t.rows["path"].tolist() == [good]
    assert outside_paths(t) == sorted([str(there), str(there).replace("00009", "00008")])


def test_chexpert_dotdot_is_dropped_and_symlinked_patient_folder_followed(place):
    root, elsewhere = place
    png(elsewhere / "patient00007/study1/view1_frontal.jpg")
    link(root / "CheXpert-v1.0-small/train/patient00005", elsewhere / "patient00007")
    climb = "CheXpert-v1.0-small/../../elsewhere/patient00007/study1/view1_frontal.jpg"
    linked = "CheXpert-v1.0-small/train/patient00005/study1/view1_frontal.jpg"
    d = root / "CheXpert-v1.0-small"
    (d / "train.csv").write_text(CHEX_HEADER + chex_row(climb) + chex_row(linked))
    (d / "valid.csv").write_text(CHEX_HEADER)
    t = read_chexpert(root)
    assert t.rows["path"].tolist() == [linked] and outside_paths(t) == [climb]


RSNA_HEADER = "patientId,x,y,width,height,Target\n"


def test_rsna_patient_id_climbing_out_is_dropped_and_symlinked_dicom_followed(place):
    root, elsewhere = place
    dicom(root / "stage_2_train_images/good.dcm")
    link(root / "stage_2_train_images/linked.dcm", elsewhere / "notadicom.dcm")
    (root / "stage_2_train_labels.csv").write_text(
        RSNA_HEADER + "good,,,,,0\n../../elsewhere/notadicom,10,10,5,5,1\nlinked,,,,,0\n"
    )
    t = read_rsna(root)
    assert t.rows["image_id"].tolist() == ["good", "linked"]  # the link is read (and fails at decode, if bad)
    assert outside_paths(t) == ["stage_2_train_images/../../elsewhere/notadicom.dcm"]
    assert t.boxes == {}  # the escaping positive's box went with it


def test_siim_climbing_id_is_dropped_and_symlinked_series_followed(place):
    root, elsewhere = place
    base = root / "dicom-images-train"
    dicom(base / "st1/se1/good.dcm", "p1")
    link(base / "st2/se2/filelink.dcm", elsewhere / "notadicom.dcm")  # followed: an unreadable file
    dicom(elsewhere / "series/dirlink.dcm", "p3")
    link(base / "st3/se3", elsewhere / "series")
    (root / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\ngood, -1\nfilelink, -1\ndirlink, 1 2\n../../elsewhere/notadicom, -1\nabsent, -1\n"
    )
    t = read_siim(root)
    assert t.rows["image_id"].tolist() == ["dirlink", "good"]  # a linked series folder is the user's layout
    # a CSV id that climbs out: 'outside', not 'missing file'
    assert outside_paths(t) == ["dicom-images-train/../../elsewhere/notadicom.dcm"]
    assert ("dicom-images-train/st2/se2/filelink.dcm", "unreadable file") in t.dropped  # followed, then not a DICOM
    assert ("dicom-images-train/absent.dcm", "missing file") in t.dropped
    assert t.rles == {"dirlink": ["1 2"]}


def write_covidx(root: Path, train: list[str], test: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train_COVIDx9A.txt").write_text("".join(f"{line}\n" for line in train))
    (root / "test_COVIDx9A.txt").write_text("".join(f"{line}\n" for line in test))


def test_covidx_climbing_files_are_dropped_and_symlinks_followed(place):
    root, elsewhere = place
    link(root / "train/linked.png", elsewhere / "secret.png")
    write_covidx(root, ["1 a.png normal rsna", "2 ../../elsewhere/secret.png normal rsna",
                        "3 ../../elsewhere/nothing.png normal rsna", f"4 {elsewhere}/secret.png normal rsna",
                        "5 linked.png normal rsna", "6 sub/../b.png pneumonia rsna"],
                 ["7 c.png COVID-19 ricord"])  # fmt: skip
    t = read_covidx(root)
    # '..' that stays inside is fine; an absolute file name is read under train/, so inside the root too
    kept = ["test/c.png", f"train/{elsewhere}/secret.png", "train/a.png", "train/linked.png", "train/sub/../b.png"]
    assert t.rows["path"].tolist() == kept and not escapes_root(root, kept[1])
    assert outside_paths(t) == ["train/../../elsewhere/nothing.png", "train/../../elsewhere/secret.png"]


def test_objcxr_climbing_images_are_dropped_and_symlinks_followed(place):
    root, elsewhere = place
    link(root / "dev/linked.jpg", elsewhere / "secret.jpg")
    (root / "train.csv").write_text(
        "image_name,annotation\n00001.jpg,\n../../elsewhere/secret.jpg,0 1 1 4 4\n../../../x.jpg,\n"
    )
    (root / "dev.csv").write_text("image_name,annotation\n08001.jpg,\nlinked.jpg,0 1 1 4 4\n")
    t = read_objcxr(root)
    assert t.rows["path"].tolist() == ["dev/08001.jpg", "dev/linked.jpg", "train/00001.jpg"]
    assert outside_paths(t) == ["train/../../../x.jpg", "train/../../elsewhere/secret.jpg"]


def test_preprocess_refuses_a_split_file_path_outside_the_root(place, tmp_path):
    """A hand-edited split file is a data file too: its path is checked before the file is looked at."""
    root, elsewhere = place
    png(root / "train/a.png")
    rows = split_frame(["train/a.png", "../elsewhere/secret.png", "../elsewhere/nothing.png"])
    table = table_of(rows)
    quality = tmp_path / "q.json"
    build_cache(table, rows, root, tmp_path / "cache" / "covidx", S, 1, 1.0, "covidx", quality)
    entries = json.loads(quality.read_text())["skipped"]
    assert entries == [{"path": "../elsewhere/secret.png", "reason": OUTSIDE},
                       {"path": "../elsewhere/nothing.png", "reason": OUTSIDE}]  # fmt: skip
    assert read_split_csv(tmp_path / "cache/covidx/index.csv")["path"].tolist() == ["train/a.png"]


def split_frame(paths: list[str]) -> pd.DataFrame:
    """A COVIDx-style split file frame, one train row (and patient) per path."""
    n = len(paths)
    return pd.DataFrame({"image_id": paths, "patient_id": [str(i) for i in range(n)], "path": paths, "split": "train",
                         "pct": pd.array([100] * n, dtype="Int64"), "label": "normal"})  # fmt: skip


def table_of(split: pd.DataFrame) -> DatasetTable:
    """The reader's table behind a split frame (nothing dropped, excluded, boxed)."""
    rows = split.drop(columns=["split", "pct"]).assign(official_split="")
    return DatasetTable(rows=rows[["image_id", "patient_id", "path", "official_split", "label"]])


# --------------------------------------------------------------------------- boxes outside the image


def cache_of(root: Path, tmp_path: Path, table, dataset: str, max_skip: float = 1.0):
    split = table.rows.drop(columns="official_split")
    split.insert(3, "split", "train")
    split.insert(4, "pct", pd.array([100] * len(split), dtype="Int64"))
    out, quality = tmp_path / "cache" / dataset, tmp_path / f"{dataset}.json"
    build_cache(table, split, root, out, S, 1, max_skip, dataset, quality)
    return out, json.loads(quality.read_text())


def test_rsna_boxes_outside_partly_outside_and_all_gone(tmp_path):
    root = tmp_path / "rsna"
    for pid in ("mixed", "lost", "neg"):
        dicom(root / f"stage_2_train_images/{pid}.dcm", pid, h=80, w=100)
    (root / "stage_2_train_labels.csv").write_text(
        RSNA_HEADER
        + "mixed,80,20,40,20,1\n"  # (80, 20, 120, 40): past the right edge, clipped to (80, 20, 100, 40), kept
        + "mixed,5000,5000,100,100,1\n"  # the box: no pixel of it inside
        + "lost,5000,5000,100,100,1\n"  # its only box: the image goes
        + "neg,,,,,0\n"
    )
    out, report = cache_of(root, tmp_path, read_rsna(root), "rsna")
    index = read_split_csv(out / "index.csv")
    assert index["image_id"].tolist() == ["mixed", "neg"]
    # 100 x 80 -> 50 x 40 (scale 0.5), 5 zero rows above: (80, 20, 100, 40) -> (40, 15, 50, 25)
    boxes = pd.read_csv(out / "boxes.csv")
    assert boxes.values.tolist() == [["mixed", 40.0, 15.0, 50.0, 25.0]]
    expected = np.zeros((S, S), np.uint8)
    expected[15:25, 40:50] = 1
    masks = np.load(out / "masks.npy")
    assert (masks[0] == expected).all() and not masks[1].any()
    assert report["boxes_dropped"] == [  # in split order: lost, mixed, neg
        {"image_id": "lost", "path": "stage_2_train_images/lost.dcm", "box": [5000.0, 5000.0, 5100.0, 5100.0],
         "reason": "no area inside the 100x80 image"},
        {"image_id": "mixed", "path": "stage_2_train_images/mixed.dcm", "box": [5000.0, 5000.0, 5100.0, 5100.0],
         "reason": "no area inside the 100x80 image"},
    ]  # fmt: skip
    assert report["skipped"] == [{"path": "stage_2_train_images/lost.dcm", "reason": "no box inside the image"}]
    assert report["counts"]["skipped"] == 1 and report["counts"]["kept"] == 2


def test_objcxr_box_outside_and_degenerate_box(tmp_path):
    root = tmp_path / "objcxr"
    for name in ("00001.jpg", "00002.jpg", "00003.jpg"):
        png(root / "train" / name, h=60, w=50)
    png(root / "dev/08001.jpg", h=60, w=50)
    (root / "train.csv").write_text(
        "image_name,annotation\n"
        "00001.jpg,0 5000 5000 5100 5100\n"  # the annotation
        "00002.jpg,0 10 20 10 40;1 -30 -30 -1 10;0 0 0 25 30\n"  # zero width, left of the image, a good one
        "00003.jpg,\n"
    )
    (root / "dev.csv").write_text("image_name,annotation\n08001.jpg,\n")
    out, report = cache_of(root, tmp_path, read_objcxr(root), "objcxr")
    assert read_split_csv(out / "index.csv")["image_id"].tolist() == ["dev/08001.jpg", "train/00002.jpg",
                                                                     "train/00003.jpg"]  # fmt: skip
    # 50 x 60 -> 42 x 50 (scale 5/6, width rounded), 4 zero columns left: (0, 0, 25, 30) -> (4, 0, 24.833, 25)
    assert pd.read_csv(out / "boxes.csv").values.tolist() == [["train/00002.jpg", 4.0, 0.0, 24.833, 25.0]]
    lost = [(e["image_id"], e["box"], e["reason"]) for e in report["boxes_dropped"]]
    assert lost == [
        ("train/00001.jpg", [5000.0, 5000.0, 5100.0, 5100.0], "no area inside the 50x60 image"),
        ("train/00002.jpg", [10.0, 20.0, 10.0, 40.0], "no area inside the 50x60 image"),
        ("train/00002.jpg", [-30.0, -30.0, -1.0, 10.0], "no area inside the 50x60 image"),
    ]
    assert report["skipped"] == [{"path": "train/00001.jpg", "reason": "no box inside the image"}]


def test_all_boxes_gone_counts_toward_max_skip_fraction(tmp_path):
    root = tmp_path / "rsna"
    for pid in ("a", "b"):
        dicom(root / f"stage_2_train_images/{pid}.dcm", pid, h=20, w=20)
    (root / "stage_2_train_labels.csv").write_text(RSNA_HEADER + "a,100,100,5,5,1\nb,,,,,0\n")
    with pytest.raises(DataError, match=r"1 of 2 images unusable.*stage_2_train_images/a\.dcm \(no box inside"):
        cache_of(root, tmp_path, read_rsna(root), "rsna", max_skip=0.1)
    assert not (tmp_path / "cache/rsna").exists()


# --------------------------------------------------------------------------- empty splits


def split_error(table, valid=0.2, test=0.0) -> str:
    spec = SplitSpec(valid, test, label_columns=())
    split, dropped = assign_splits(table.rows, spec, 0)
    with pytest.raises(DataError) as err:
        check_splits_not_empty(split, table, dropped, spec, "ds")
    return str(err.value)


def test_empty_train_all_lateral_names_the_file(tmp_path):
    d = write_chexpert(tmp_path, [chex_row(f"CheXpert-v1.0-small/train/patient0000{i}/s/v.jpg", "Lateral")
                                  for i in range(4)],
                       [chex_row("CheXpert-v1.0-small/valid/patient00090/s/v.jpg")])  # fmt: skip
    msg = split_error(read_chexpert(tmp_path))
    assert msg.startswith("the train and valid splits are empty")
    assert f"train: nothing is left of {d / 'train.csv'} (the train pool)" in msg
    assert "excluded lateral 4" in msg and "test:" not in msg


def test_empty_test_official_set_all_dropped_names_valid_csv(tmp_path):
    d = write_chexpert(tmp_path, [chex_row(f"CheXpert-v1.0-small/train/patient0000{i}/s/v.jpg") for i in range(9)],
                       [chex_row("CheXpert-v1.0-small/valid/patient00090/s/v.jpg", "Lateral"),
                        chex_row("/abs/patient00091/s/v.jpg")])  # fmt: skip
    msg = split_error(read_chexpert(tmp_path), valid=0.5)
    assert msg.startswith("the test split is empty")
    assert f"nothing is left of {d / 'valid.csv'} (the official test set)" in msg
    assert f"dropped {OUTSIDE} 1" in msg and "excluded lateral 1" in msg


def test_empty_valid_by_a_zero_or_too_small_fraction(tmp_path):
    write_covidx(tmp_path, [f"{i} t{i}.png normal rsna" for i in range(3)], ["9 x.png normal rsna"])
    table = read_covidx(tmp_path)
    assert "ds has no official valid set and data.ds.valid_fraction is 0" in split_error(table, valid=0.0)
    msg = split_error(table, valid=0.01)
    assert "data.ds.valid_fraction 0.01 put none of the 3 train-pool patients" in msg
    assert str(tmp_path / "train_COVIDx9A.txt") in msg


def test_empty_train_when_the_split_drops_every_pool_row(tmp_path):
    # every train-list patient also has a test image: the official test set wins
    write_covidx(tmp_path, ["1 a.png normal rsna", "2 b.png normal rsna"],
                 ["1 c.png normal rsna", "2 d.png normal rsna"])  # fmt: skip
    msg = split_error(read_covidx(tmp_path))
    assert "train: all 2 rows the reader kept from" in msg and "(patient also in official test 2)" in msg


def test_empty_pool_because_every_path_escapes(place):
    root, _ = place
    (root / "stage_2_train_labels.csv").write_text(RSNA_HEADER + "../../a,,,,,0\n../../b,,,,,0\n")
    msg = split_error(read_rsna(root), valid=0.2, test=0.2)
    assert msg.startswith("the train, valid and test splits are empty")
    assert f"nothing is left of {root / 'stage_2_train_labels.csv'} (the train pool)" in msg
    assert f"dropped {OUTSIDE} 2" in msg


# --------------------------------------------------------------------------- stale temporary folders


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temp_folders_of_dead_runs_are_removed(tmp_path):
    root = tmp_path / "covidx"
    png(root / "train/a.png")
    cache = tmp_path / "cache"
    dead = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftovers = [f".covidx.tmp-{dead}", f".covidx.old-{dead}", f".covidx.tmp-{alive.pid}", f".rsna.tmp-{dead}"]
        for name in leftovers:
            (cache / name).mkdir(parents=True)
            np.save(cache / name / "images.npy", np.zeros((2, 4, 4), np.uint8))
        split = split_frame(["train/a.png"])
        summary = build_cache(table_of(split), split, root, cache / "covidx", S, 1, 0.0, "covidx", tmp_path / "q.json")
    finally:
        alive.kill()
        alive.wait()
    assert summary["stale_removed"] == [f".covidx.tmp-{dead}", f".covidx.old-{dead}"]
    # a live run's folder and another dataset's folder stay
    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted(["covidx", f".covidx.tmp-{alive.pid}", f".rsna.tmp-{dead}"])


# --------------------------------------------------------------------------- the stages, as DVC runs them


def run(wd: Path, stage: str, ds: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), ds], cwd=wd, capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


def stage_dir(tmp_path: Path, ds: str, root: Path, **cfg) -> Path:
    wd = tmp_path / "wd"
    wd.mkdir()
    params = deep_merge(repo_params_dict(), {"data": {"image_size": 16, "workers": 1, ds: {"root": str(root), **cfg}}})
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return wd


@pytest.mark.slow
def test_stages_drop_escaping_covidx_rows_and_clean_a_killed_run(place, tmp_path):
    root, elsewhere = place
    train = [f"{i} t{i}.png normal rsna" for i in range(10)]
    train += ["20 ../../elsewhere/secret.png normal rsna", "21 ../../elsewhere/nothing.png normal rsna"]
    write_covidx(root, train, ["30 x.png pneumonia rsna", "31 y.png COVID-19 rsna"])
    for i in range(10):
        png(root / f"train/t{i}.png")
    png(root / "test/x.png")
    png(root / "test/y.png")
    wd = stage_dir(tmp_path, "covidx", root, valid_fraction=0.5)
    stale = wd / f"data/cache/.covidx.tmp-{dead_pid()}"  # what a SIGKILL during preprocess leaves
    stale.mkdir(parents=True)
    (stale / "images.npy").write_bytes(b"partial")

    proc = run(wd, "split", "covidx")
    assert proc.returncode == 0, proc.stderr
    dropped = pd.read_csv(wd / "data/splits/covidx.dropped.csv")
    assert dropped.values.tolist() == [["train/../../elsewhere/nothing.png", OUTSIDE],
                                       ["train/../../elsewhere/secret.png", OUTSIDE]]  # fmt: skip
    assert "elsewhere" not in (wd / "data/splits/covidx.csv").read_text()

    proc = run(wd, "preprocess", "covidx")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists()
    quality = json.loads((wd / "reports/data_quality/covidx.json").read_text())
    # the file that exists and the one that does not read the same: nothing about them was looked up
    assert [e for e in quality["skipped"] if "elsewhere" in e["path"]] == [
        {"path": "train/../../elsewhere/nothing.png", "reason": OUTSIDE},
        {"path": "train/../../elsewhere/secret.png", "reason": OUTSIDE},
    ]
    assert quality["counts"]["dropped_by_split"] == 2 and quality["boxes_dropped"] == []
    assert np.load(wd / "data/cache/covidx/images.npy").shape == (12, 16, 16)


@pytest.mark.slow
def test_split_stage_stops_on_an_all_lateral_chexpert(tmp_path):
    root = tmp_path / "chexpert"
    lateral = [chex_row(f"CheXpert-v1.0-small/train/patient0000{i}/s/v.jpg", "Lateral") for i in range(5)]
    d = write_chexpert(root, lateral, [chex_row("CheXpert-v1.0-small/valid/patient00090/s/v.jpg")])
    wd = stage_dir(tmp_path, "chexpert", root)
    proc = run(wd, "split", "chexpert")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: split chexpert: the train and valid splits are empty")
    assert str(d / "train.csv") in proc.stderr and "excluded lateral 5" in proc.stderr
    assert not (wd / "data").exists()  # nothing written for the next stage to trip on

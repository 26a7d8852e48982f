"""NIH ChestX-ray14: the reader on hand-made files in the real layout (both image folder layouts, both label file
names, every kind of bad row), the synthetic corpus read back against the drawn truth, and a `cls_nih` cell
end to end on the tiny corpus."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mflag.data.cache import build_cache
from mflag.data.nih import LABELS, read_nih
from mflag.data.split import SplitSpec, assign_splits, read_split_csv
from mflag.data.table import DataError
from tests.conftest import REPO, deep_merge, run_stage

# The released files' first lines: Data_Entry_2017.csv splits the bracketed names at their commas and ends every
# line with a comma; the v2020 file has no trailing comma; BBox_List_2017.csv ends its header with three commas.
HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")  # fmt: skip
HEADER_2020 = HEADER_2017[:-1]
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NEVER_DRAWN = ("Infiltration", "Mass", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


def png(path: Path, value: int = 200, rgba: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((12, 10), value, np.uint8)
    img[2:6, 3:7] = 40
    if rgba:
        img = np.dstack([img, img, img, np.full_like(img, 255)])
    Image.fromarray(img).save(path, format="PNG")


def row(name: str, labels: str, patient: str, followup: int = 0, trailing: bool = True) -> str:
    return f"{name},{labels},{followup},{patient},58,M,PA,2682,2749,0.143,0.143" + ("," if trailing else "")


def write_nih(root: Path, rows: list[str], train_val: list[str], test: list[str], *,
              entry: str = "Data_Entry_2017.csv", header: str = HEADER_2017) -> None:  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / entry).write_text(header + "\n" + "".join(r + "\n" for r in rows))
    (root / "train_val_list.txt").write_text("".join(n + "\n" for n in train_val))
    (root / "test_list.txt").write_text("".join(n + "\n" for n in test))


def labels_of(table, image_id: str) -> list[str]:
    r = table.rows.set_index("image_id").loc[image_id]
    return [c for c in LABELS if r[c] == 1]


def test_rows_labels_and_bad_rows_in_the_numbered_layout(tmp_path):
    root = tmp_path / "nih"
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png", "00000005_000.png", "00000006_000.png",
                 "00000007_000.png", "00000008_000.png"):  # fmt: skip
        png(root / "images_001/images" / name)
    png(root / "images_002/images/00000003_000.png", rgba=True)
    png(root / "images_002/images/00000004_000.png")
    rows = [
        row("00000001_000.png", "No Finding", "1"),
        row("00000001_001.png", "Effusion|Infiltration|Mass", "1", 1),
        row("00000002_000.png", "Pleural_Thickening", "2"),
        row("00000003_000.png", "Hernia|Cardiomegaly", "3"),  # in images_002/, RGBA
        row("00000004_000.png", "Pneumonitis", "4"),  # not an NIH label: bad label
        row("00000005_000.png", "No Finding|Effusion", "5"),  # contradicts itself: bad label
        row("00000006_000.png", "", "6"),  # empty: bad label
        row("00000001_001.png", "Nodule", "1", 1),  # the same Image Index again: duplicate, the first kept
        row("00000009_000.png", "Edema", "9"),  # listed, labelled, but found in no image folder
        row("00000007_000.png", "Atelectasis", "7"),  # in neither list: excluded
        row("00000008_000.png", "Emphysema|Fibrosis", "8"),  # test
    ]
    listed = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png", "00000004_000.png",
              "00000005_000.png", "00000006_000.png", "00000009_000.png", "00000010_000.png"]  # fmt: skip
    write_nih(root, rows, listed, ["00000008_000.png"])
    t = read_nih(root)
    assert list(t.rows.columns) == ["image_id", "patient_id", "path", "official_split", *LABELS]
    assert all(str(t.rows[c].dtype) == "int64" for c in LABELS)
    r = t.rows.set_index("image_id")
    assert list(r.index) == ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png",
                             "00000008_000.png"]  # fmt: skip
    assert r.loc["00000001_000.png", list(LABELS)].sum() == 0  # No Finding: all zero
    assert labels_of(t, "00000001_001.png") == ["Effusion", "Infiltration", "Mass"]
    assert labels_of(t, "00000002_000.png") == ["Pleural_Thickening"]
    assert labels_of(t, "00000003_000.png") == ["Cardiomegaly", "Hernia"]
    assert labels_of(t, "00000008_000.png") == ["Emphysema", "Fibrosis"]
    assert r.loc["00000003_000.png", "path"] == "images_002/images/00000003_000.png"
    assert r.loc["00000001_000.png", "path"] == "images_001/images/00000001_000.png"
    assert r.loc["00000001_001.png", "patient_id"] == "1" and isinstance(r.loc["00000003_000.png", "patient_id"], str)
    assert r["official_split"].to_dict() == {"00000001_000.png": "train", "00000001_001.png": "train",
                                             "00000002_000.png": "train", "00000003_000.png": "train",
                                             "00000008_000.png": "test"}  # fmt: skip
    assert sorted(t.dropped) == [
        ("00000009_000.png", "missing file"),
        ("images_001/images/00000001_001.png", "duplicate row"),
        ("images_001/images/00000005_000.png", "bad label"),
        ("images_001/images/00000006_000.png", "bad label"),
        ("images_002/images/00000004_000.png", "bad label"),
    ]
    assert t.excluded == {"not_in_data_entry": 1, "not_in_lists": 1}  # 00000010 listed, not labelled; 00000007
    assert t.sources == {"test": str(root / "test_list.txt"), "train": str(root / "train_val_list.txt")}
    # BBox_List_2017.csv is optional and changes nothing
    (root / "BBox_List_2017.csv").write_text(BBOX_HEADER + "\n00000008_000.png,Mass,1.5,2.5,3,4,,,\n")
    assert read_nih(root).rows.equals(t.rows)

    # the cache reads the RGBA PNG as grey, like the others (mflag.data.images: PIL's convert("L"))
    split = t.rows.drop(columns="official_split")
    split.insert(3, "split", "train")
    split.insert(4, "pct", pd.array([100] * len(split), dtype="Int64"))
    out = tmp_path / "cache"
    build_cache(t, split, root, out, 20, 1, 0.0, "nih", tmp_path / "nih.json")
    index, images = read_split_csv(out / "index.csv"), np.load(out / "images.npy")
    assert len(index) == 5 and images.shape == (5, 20, 20)
    grey, rgba = (images[index["image_id"].tolist().index(n)] for n in ("00000002_000.png", "00000003_000.png"))
    assert (grey == rgba).all() and grey.max() == 200
    assert list(index.columns) == list(split.columns)


def test_flat_images_folder_and_the_v2020_label_file_preferred(tmp_path):
    root = tmp_path / "nih"
    png(root / "images/00000001_000.png")
    png(root / "images_001/images/00000001_000.png", value=100)  # the same name again: images/ is read
    png(root / "images/00000002_000.png")
    write_nih(root, [row("00000001_000.png", "Nodule", "1"), row("00000002_000.png", "No Finding", "2")],
              ["00000001_000.png"], ["00000002_000.png"])  # fmt: skip
    t = read_nih(root)
    assert labels_of(t, "00000001_000.png") == ["Nodule"]
    assert t.rows["path"].tolist() == ["images/00000001_000.png", "images/00000002_000.png"]
    # with both label files present, the v2020 one is read (its rows differ here to tell them apart)
    write_nih(root, [row("00000001_000.png", "Mass", "1", trailing=False),
                     row("00000002_000.png", "Hernia", "2", trailing=False)],
              ["00000001_000.png"], ["00000002_000.png"], entry="Data_Entry_2017_v2020.csv",
              header=HEADER_2020)  # fmt: skip
    t = read_nih(root)
    assert labels_of(t, "00000001_000.png") == ["Mass"] and labels_of(t, "00000002_000.png") == ["Hernia"]
    (root / "Data_Entry_2017.csv").unlink()  # the v2020 file alone
    assert read_nih(root).rows.equals(t.rows)


def test_errors_name_the_file_and_the_column(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    with pytest.raises(DataError, match=r"Data_Entry_2017_v2020\.csv nor Data_Entry_2017\.csv"):
        read_nih(root)
    (root / "Data_Entry_2017.csv").write_text(HEADER_2017 + "\n")
    with pytest.raises(DataError, match=r"test_list\.txt"):
        read_nih(root)
    write_nih(root, [], [], [], header=HEADER_2017.replace("Patient ID", "PatientID"))
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv.*'Patient ID'"):
        read_nih(root)
    write_nih(root, [row("00000001_000.png", "No Finding", "")], ["00000001_000.png"], [])
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv: line 2: empty Patient ID"):
        read_nih(root)


def test_names_leaving_the_root_are_dropped_and_symlinked_folders_followed(tmp_path):
    root, elsewhere = tmp_path / "nih", tmp_path / "elsewhere"
    png(elsewhere / "images/00000002_000.png")
    png(elsewhere / "secret.png")
    png(root / "images_001/images/00000001_000.png")
    os.symlink(elsewhere, root / "images_002")  # the user's own layout: followed
    names = ["00000001_000.png", "00000002_000.png", "../../elsewhere/secret.png", str(elsewhere / "secret.png"),
             "sub/../00000001_000.png"]  # fmt: skip
    write_nih(root, [row(n, "No Finding", str(k)) for k, n in enumerate(names, 1)], names, [])
    t = read_nih(root)
    assert t.rows["path"].tolist() == ["images_001/images/00000001_000.png", "images_002/images/00000002_000.png"]
    assert sorted(t.dropped) == sorted([
        ("../../elsewhere/secret.png", "path outside the dataset root"),
        (str(elsewhere / "secret.png"), "path outside the dataset root"),
        ("sub/../00000001_000.png", "missing file"),  # a file name, not a path: no image folder holds it
    ])  # fmt: skip


def test_split_keeps_the_test_list_and_draws_valid_from_train_val_by_patient(tmp_path):
    root = tmp_path / "nih"
    rows, train_val, test = [], [], []
    for p in range(1, 41):
        for k in range(2):
            name = f"{p:08d}_{k:03d}.png"
            png(root / "images" / name)
            rows.append(row(name, "Effusion" if p % 3 == 0 else "No Finding", str(p), k))
            (test if p > 30 else train_val).append(name)
    write_nih(root, rows, train_val, test)
    t = read_nih(root)
    split, dropped = assign_splits(t.rows, SplitSpec(0.3, 0.0, label_columns=LABELS), seed=42)
    assert dropped == []
    assert sorted(split.loc[split["split"] == "test", "image_id"]) == sorted(test)
    valid = set(split.loc[split["split"] == "valid", "patient_id"])
    assert valid and valid <= {str(p) for p in range(1, 31)}
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    train = split[split["split"] == "train"]
    assert (train.loc[train["pct"] == 1, "Effusion"] == 1).any()  # stratified: the 1 % subset holds a positive


# ------------------------------------------------------------------------------- the synthetic corpus
# finding kind -> NIH label, written here independently of mflag.synth.corpus.nih_labels
def _expected_labels(findings: list, infectious: list[bool]) -> set[str]:
    out = set()
    for (kind, _side, _zone, size, _hedged, _subtype), pneumonia in zip(findings, infectious, strict=True):
        if kind == "consolidation" and pneumonia:
            out.add("Pneumonia")
        out |= {"consolidation": {"Consolidation"}, "atelectasis": {"Atelectasis"}, "effusion": {"Effusion"},
                "cardiomegaly": {"Cardiomegaly"}, "edema": {"Edema"}, "pneumothorax": {"Pneumothorax"},
                "covid": {"Pneumonia"},
                "nodule": {"Mass" if size == "large" else "Nodule"}}.get(kind, set())  # fmt: skip
    return out


def test_synthetic_nih_layout_reads_back_with_the_drawn_labels(tiny_corpus):
    root = tiny_corpus / "nih"
    assert (root / "Data_Entry_2017.csv").read_text().splitlines()[0] == HEADER_2017
    assert (root / "BBox_List_2017.csv").read_text().splitlines()[0] == BBOX_HEADER
    entry = pd.read_csv(root / "Data_Entry_2017.csv", dtype=str)
    train_val = (root / "train_val_list.txt").read_text().split()
    test = (root / "test_list.txt").read_text().split()
    assert (len(train_val), len(test)) == (24, 10) and sorted(train_val + test) == sorted(entry["Image Index"])
    patients = dict(zip(entry["Image Index"], entry["Patient ID"]))
    assert not {patients[n] for n in train_val} & {patients[n] for n in test}  # patient-disjoint lists
    assert entry.groupby("Patient ID").size().max() > 1  # follow-ups
    for pid, g in entry.groupby("Patient ID"):
        assert sorted(g["Follow-up #"].astype(int)) == list(range(len(g)))
        assert g["Image Index"].tolist() == [f"{int(pid):08d}_{int(k):03d}.png" for k in g["Follow-up #"]]
        assert g["Patient Gender"].nunique() == 1 and set(g["Patient Gender"]) <= {"M", "F"}
    assert set(entry["View Position"]) <= {"PA", "AP"}

    lines = (tiny_corpus / "truth/nih.jsonl").read_text().splitlines()
    truth = {json.loads(line)["path"]: json.loads(line) for line in lines}
    t = read_nih(root)
    assert len(t.rows) == 34 and not t.dropped and not t.excluded
    assert set(t.rows["path"]) == set(truth)
    for r in t.rows.to_dict("records"):
        assert r["path"] == f"images_001/images/{r['image_id']}"  # 34 images: one folder of 1,000
        assert r["official_split"] == ("test" if r["image_id"] in test else "train")
        drawn = truth[r["path"]]
        assert {c for c in LABELS if r[c]} == _expected_labels(drawn["findings"], drawn["infectious"]), r["image_id"]
    drawn = {c for c in LABELS if t.rows[c].any()}
    assert not drawn & set(NEVER_DRAWN) and len(drawn) >= 6
    assert t.rows["Pneumonia"].any() and (t.rows["Consolidation"] > t.rows["Pneumonia"]).any()  # both kinds drawn
    # boxes: the pneumonia patches of test images, as the real file's boxes lie on test images
    boxes = pd.read_csv(root / "BBox_List_2017.csv", dtype=str).iloc[:, :6]
    assert set(boxes.iloc[:, 1]) <= {"Pneumonia"} and set(boxes.iloc[:, 0]) <= set(test)
    pneumonia = set(t.rows.loc[t.rows["Pneumonia"] == 1, "image_id"])
    assert set(boxes.iloc[:, 0]) <= pneumonia and (boxes.iloc[:, 2:].astype(float).to_numpy()[:, 2:] > 0).all()


def test_a_cls_nih_cell_runs_with_labels_absent_from_every_split(stage_workdir):
    """The tiny corpus' never-drawn labels are 0 in train, valid and test: the cell runs (no SubsetError), and the
    macro AUC skips them (`auc_per_label` null, each seed's `auc_skipped` lists them)."""
    from tests.test_finetune_stage import TINY_FINETUNE

    wd = stage_workdir
    params = yaml.safe_load((wd / "params.yaml").read_text())
    (wd / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, {"finetune": TINY_FINETUNE}), sort_keys=False))
    if not (wd / "models/random/vision_encoder.safetensors").is_file():
        run_stage(wd, sys.executable, str(REPO / "stages/init_random.py"))
    split = pd.read_csv(wd / "data/splits/nih.csv", dtype={"image_id": str, "patient_id": str})
    assert set(split["split"]) == {"train", "valid", "test"} and (split[list(NEVER_DRAWN)] == 0).all().all()
    run_stage(wd, sys.executable, str(REPO / "stages/finetune.py"), "cls_nih", "random")
    for pct in (1, 10, 100):
        out = json.loads((wd / f"reports/finetune/cls_nih-{pct}-random/metrics.json").read_text())
        assert (out["job"], out["pct"]) == ("cls_nih", pct) and "not_evaluable" not in out
        assert 0.0 <= out["auc"] <= 1.0
        skipped = {k for k, auc in enumerate(out["auc_per_label"]) if auc is None}
        assert {LABELS.index(c) for c in NEVER_DRAWN} <= skipped and len(skipped) < len(LABELS)
        assert all(set(r["auc_skipped"]) == skipped for r in out["per_seed"])  # the same test labels for every seed
        assert out["n_train"] == int(((split["split"] == "train") & (split["pct"] <= pct)).sum())


def test_labels_without_any_positive_anywhere_neither_stop_nor_warn():
    """checks.check_subsets: a multi-label job whose some labels are 0 in every split (the synthetic NIH's never-drawn
    findings) runs as any other; only a train subset with every label of one class stops or warns."""
    from mflag.finetune.checks import check_subsets
    from mflag.finetune.data import TaskData

    y = np.zeros((12, len(LABELS)), np.float32)
    y[::2, LABELS.index("Effusion")] = 1  # one label with both classes in every split; the other 13 all 0
    rows = np.arange(12)
    data = TaskData("nih", np.zeros((12, 4, 4), np.uint8), pd.DataFrame(index=rows), rows[:6], rows[6:9], rows[9:],
                    labels=y, kind="multilabel")  # fmt: skip
    check = check_subsets(data, "cls", 1)
    assert check.not_evaluable is None and check.warnings == []


def test_the_three_copies_of_the_label_list_agree():
    """The reader, the split's stratification columns (mflag.data imports no reader) and the corpus (whose stage
    does not depend on mflag/data) each hold the 14 names, in NIH's order."""
    from mflag.data import LABEL_COLUMNS
    from mflag.synth.corpus import NIH_LABELS

    assert LABEL_COLUMNS["nih"] == LABELS == NIH_LABELS and len(set(LABELS)) == 14

"""The embedded corpus, checked with independent tools: pydicom, PIL, pandas, and decoders written here."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from matplotlib.path import Path as PolyPath
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from scipy.ndimage import binary_dilation

from mflag.synth.corpus import generate
from tests.conftest import TINY_SYNTHETIC, params_with

# The real files' headers (from the datasets' documentation), the reference the corpus must match.
CHEXPERT_HEADER = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
    "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
MIMIC_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
    "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
]  # fmt: skip
# finding kind -> the CheXpert label it must raise, and words a report uses for it
KIND_LABEL = {
    "consolidation": "Consolidation", "atelectasis": "Atelectasis", "effusion": "Pleural Effusion",
    "cardiomegaly": "Cardiomegaly", "edema": "Edema", "pneumothorax": "Pneumothorax", "covid": "Pneumonia",
    "nodule": "Lung Lesion", "device": "Support Devices",
}  # fmt: skip
LABEL_WORDS = {
    "Consolidation": r"consolidat|airspace|air-space|opacit",
    "Pneumonia": r"pneumonia|covid|infect",
    "Atelectasis": r"atelecta|collapse",
    "Pleural Effusion": r"effusion",
    "Cardiomegaly": r"cardiomegaly|heart|cardiac",
    "Enlarged Cardiomediastinum": r"cardiomegaly|heart|cardiac|cardiomediastinal|mediastin",
    "Edema": r"edema",
    "Pneumothorax": r"pneumothora",
    "Lung Lesion": r"nodul|lesion",
    "Lung Opacity": r"opacit|consolidat|atelecta|edema|nodul|ground|airspace|haz",
    "Support Devices": r"tube|catheter|line|pacemaker|pacer|lead|device|picc",
}
HEDGES = r"\b(may|might|possibl\w*|cannot be excluded|cannot exclude|can ?not be ruled out|likely|could|question\w*|suggest\w*|suspicio\w*|probabl\w*|concern\w*|not excluded|equivocal|versus)\b"


def _truth(root: Path, ds: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in (root / "truth" / f"{ds}.jsonl").read_text().splitlines()]
    return {r["path"]: r for r in rows}


def _dense_up(path: Path) -> np.ndarray:
    """Pixels as a float image where bright = dense, using pydicom's own LUT functions."""
    ds = pydicom.dcmread(path)
    arr = apply_modality_lut(ds.pixel_array, ds)
    arr = apply_voi_lut(arr, ds) if "WindowCenter" in ds else arr
    arr = arr.astype(np.float64)
    return arr.max() - arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr


def _polygon_mask(poly, shape) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    return PolyPath(np.asarray(poly)).contains_points(pts).reshape(h, w)


def _decode_rle_reference(rle: str, h: int, w: int) -> np.ndarray:
    """Stage-1 SIIM RLE, decoded the slow obvious way: relative starts, column-major."""
    flat = [0] * (h * w)
    nums = [int(v) for v in rle.split()]
    pos = 0
    for start, length in zip(nums[0::2], nums[1::2]):
        pos += start
        for k in range(length):
            flat[pos + k] = 1
        pos += length
    return np.array(flat, dtype=np.uint8).reshape(w, h).T  # column-major: fill columns first


def test_every_dicom_decodes_with_the_expected_encodings(tiny_corpus):
    dicoms = sorted((tiny_corpus / "rsna").rglob("*.dcm")) + sorted((tiny_corpus / "siim").rglob("*.dcm"))
    assert len(dicoms) == 48
    syntaxes, photometric = set(), set()
    for path in dicoms:
        ds = pydicom.dcmread(path)
        px = ds.pixel_array
        assert px.shape == (ds.Rows, ds.Columns)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        photometric.add(ds.PhotometricInterpretation)
        assert ds.PatientID and ds.ViewPosition in ("PA", "AP")
    assert JPEGBaseline8Bit in syntaxes and ExplicitVRLittleEndian in syntaxes
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    # every RSNA file is JPEG-Baseline, as the real ones are
    assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in (tiny_corpus / "rsna").rglob("*.dcm")} == {
        JPEGBaseline8Bit
    }


def test_dicom_semantics_make_lungs_darker_than_the_mediastinum(tiny_corpus):
    """With modality LUT, VOI LUT and MONOCHROME1 handled, lungs (air) are dark, the midline dense."""
    truth = _truth(tiny_corpus, "siim")
    for rel, t in truth.items():
        img = _dense_up(tiny_corpus / "siim" / rel)
        lungs = _polygon_mask(t["lungs"][0], img.shape) | _polygon_mask(t["lungs"][1], img.shape)
        h, w = img.shape
        spine = img[int(h * 0.3) : int(h * 0.6), int(w * 0.47) : int(w * 0.53)]
        assert img[lungs].mean() < spine.mean(), rel


def test_every_image_file_opens(tiny_corpus):
    images = [p for p in tiny_corpus.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert len(images) > 60
    modes = []
    for path in images:
        with Image.open(path) as im:
            im.load()
            nih = path.relative_to(tiny_corpus).parts[0] == "nih"  # some NIH PNGs are RGBA, as real ones are
            assert im.mode in (("L", "RGBA") if nih else ("L",)) and min(im.size) >= 64
            assert im.format == ("PNG" if path.suffix == ".png" else "JPEG")
            if im.mode == "RGBA":  # grey in RGB, opaque
                px = np.asarray(im)
                assert (px[..., 0] == px[..., 1]).all() and (px[..., 0] == px[..., 2]).all() and (px[..., 3] == 255).all()
            modes.append(im.mode)
    assert "RGBA" in modes


def test_mimic_layout_and_tables(tiny_corpus):
    root = tiny_corpus / "mimic"
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz", dtype=str)
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    chex = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert {"dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"} <= set(meta.columns)
    assert list(chex.columns) == ["subject_id", "study_id", *MIMIC_LABELS]
    assert set(split.split) <= {"train", "validate", "test"} and "train" in set(split.split)
    assert set(meta.ViewPosition) <= {"PA", "AP", "LATERAL"} and "LATERAL" in set(meta.ViewPosition)
    assert split.groupby("subject_id").split.nunique().max() == 1  # a patient sits in one official split
    for row in split.itertuples():
        s = row.subject_id
        assert re.fullmatch(r"1\d{7}", s) and re.fullmatch(r"5\d{7}", row.study_id)
        assert re.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}", row.dicom_id)
        assert (root / f"files/p{s[:2]}/p{s}/s{row.study_id}/{row.dicom_id}.jpg").is_file()
        assert (root / f"files/p{s[:2]}/p{s}/s{row.study_id}.txt").is_file()
    assert set(zip(chex.subject_id, chex.study_id)) == set(zip(split.subject_id, split.study_id))


def _sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"(?<=[.;:])\s+|\n\s*\n", " ".join(text.split())) if s.strip()]


def test_mimic_labels_agree_with_reports_and_truth(tiny_corpus):
    root = tiny_corpus / "mimic"
    chex = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str).fillna("")
    truth = _truth(tiny_corpus, "mimic")
    findings_by_study: dict[str, set] = {}
    for rel, t in truth.items():
        study = re.search(r"/s(\d{8})/", rel).group(1)
        findings_by_study.setdefault(study, set()).update(f[0] for f in t["findings"])
    checked_hedges = 0
    for row in chex.to_dict("records"):
        s = row["subject_id"]
        text = (root / f"files/p{s[:2]}/p{s}/s{row['study_id']}.txt").read_text()
        assert text.lstrip().startswith("FINAL REPORT")
        sentences = _sentences(text)
        for label, words in LABEL_WORDS.items():
            value = row[label]
            mentions = [x for x in sentences if re.search(words, x)]
            if value in ("1.0", "-1.0"):
                assert mentions, (label, text)
            if value == "-1.0":
                assert any(re.search(HEDGES, x) for x in mentions), (label, text)
                checked_hedges += 1
        for kind in findings_by_study[row["study_id"]] - {"foreign_object"}:
            assert row[KIND_LABEL[kind]] in ("1.0", "-1.0"), (kind, text)
    assert checked_hedges > 0


def test_chexpert_layout_and_labels(tiny_corpus):
    root = tiny_corpus / "chexpert"
    truth = _truth(tiny_corpus, "chexpert")
    for part in ("train", "valid"):
        df = pd.read_csv(root / "CheXpert-v1.0-small" / f"{part}.csv", dtype=str).fillna("")
        assert list(df.columns) == CHEXPERT_HEADER
        for row in df.to_dict("records"):
            assert re.fullmatch(rf"CheXpert-v1.0-small/{part}/patient\d{{5}}/study\d+/view\d_(frontal|lateral)\.jpg", row["Path"])
            assert (root / row["Path"]).is_file()
            assert (row["Frontal/Lateral"] == "Frontal") == ("frontal" in row["Path"])
            allowed = {"1.0", "0.0"} if part == "valid" else {"1.0", "0.0", "-1.0", ""}
            assert {row[c] for c in CHEXPERT_HEADER[5:]} <= allowed
            for kind in {f[0] for f in truth[row["Path"]]["findings"]} - {"foreign_object"}:
                assert row[KIND_LABEL[kind]] in ("1.0", "-1.0"), (kind, row)


def test_rsna_boxes_inside_their_images(tiny_corpus):
    root = tiny_corpus / "rsna"
    labels = pd.read_csv(root / "stage_2_train_labels.csv")
    classes = pd.read_csv(root / "stage_2_detailed_class_info.csv")
    assert list(labels.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    assert list(classes.columns) == ["patientId", "class"]
    assert set(classes["class"]) <= {"Lung Opacity", "No Lung Opacity / Not Normal", "Normal"}
    positives = labels[labels.Target == 1]
    assert len(positives) > 0 and labels[labels.Target == 0][["x", "y", "width", "height"]].isna().all().all()
    for row in positives.itertuples():
        ds = pydicom.dcmread(root / "stage_2_train_images" / f"{row.patientId}.dcm", stop_before_pixels=True)
        assert row.width > 0 and row.height > 0
        assert 0 <= row.x and row.x + row.width <= ds.Columns and 0 <= row.y and row.y + row.height <= ds.Rows
    assert set(labels.patientId) == {p.stem for p in (root / "stage_2_train_images").glob("*.dcm")}
    opacity = set(classes[classes["class"] == "Lung Opacity"].patientId)
    assert opacity == set(positives.patientId)


def test_siim_rle_masks_lie_inside_the_lungs(tiny_corpus):
    root = tiny_corpus / "siim"
    raw = (root / "train-rle.csv").read_text().splitlines()
    assert raw[0] == "ImageId, EncodedPixels"  # the real header, leading space included
    df = pd.read_csv(root / "train-rle.csv", dtype=str)
    assert list(df.columns) == ["ImageId", " EncodedPixels"]
    assert all(v.startswith(" ") for v in df[" EncodedPixels"])
    paths = {p.stem: p for p in (root / "dicom-images-train").glob("*/*/*.dcm")}
    assert set(df.ImageId) == set(paths)
    truth = _truth(tiny_corpus, "siim")
    positives = 0
    for image_id, rows in df.groupby("ImageId"):
        values = [v.strip() for v in rows[" EncodedPixels"]]
        ds = pydicom.dcmread(paths[image_id], stop_before_pixels=True)
        h, w = ds.Rows, ds.Columns
        if values == ["-1"]:
            continue
        assert "-1" not in values
        mask = np.zeros((h, w), np.uint8)
        for v in values:
            mask |= _decode_rle_reference(v, h, w)
        t = truth[str(paths[image_id].relative_to(root))]
        lungs = _polygon_mask(t["lungs"][0], (h, w)) | _polygon_mask(t["lungs"][1], (h, w))
        lungs = binary_dilation(lungs, iterations=1)  # two rasterisers may disagree by a pixel at the edge
        assert mask.sum() > 20
        assert (mask.astype(bool) & lungs).sum() >= 0.99 * mask.sum()
        assert any(f[0] == "pneumothorax" for f in t["findings"])
        positives += 1
    assert positives > 0
    assert df.ImageId.duplicated().any()  # some images carry several mask rows


def test_covidx_lists_match_images_and_truth(tiny_corpus):
    root = tiny_corpus / "covidx"
    truth = _truth(tiny_corpus, "covidx")
    for part, n in (("train", 14), ("test", 6)):
        df = pd.read_csv(root / f"{part}_COVIDx9A.txt", sep=" ", header=None, dtype=str)
        assert df.shape == (n, 4)
        for pid, fname, label, source in df.itertuples(index=False):
            assert label in ("normal", "pneumonia", "COVID-19") and source
            assert (root / part / fname).is_file()
            kinds = {f[0] for f in truth[f"{part}/{fname}"]["findings"]}
            assert ("covid" in kinds) == (label == "COVID-19")
            assert ("consolidation" in kinds) == (label == "pneumonia")


def test_objcxr_annotations_parse_inside_the_image(tiny_corpus):
    root = tiny_corpus / "objcxr"
    truth = _truth(tiny_corpus, "objcxr")
    seen_types = set()
    for part in ("train", "dev"):
        df = pd.read_csv(root / f"{part}.csv", dtype=str).fillna("")
        assert list(df.columns) == ["image_name", "annotation"]
        for name, ann in df.itertuples(index=False):
            w, h = Image.open(root / part / name).size
            has_object = any(f[0] == "foreign_object" for f in truth[f"{part}/{name}"]["findings"])
            assert bool(ann) == has_object
            for obj in filter(None, ann.split(";")):
                kind, *coords = obj.split()
                seen_types.add(kind)
                xs, ys = [float(v) for v in coords[0::2]], [float(v) for v in coords[1::2]]
                assert kind in ("0", "1", "2") and (len(coords) == 4 if kind != "2" else len(coords) >= 6)
                assert -2 <= min(xs) < max(xs) <= w + 2 and -2 <= min(ys) < max(ys) <= h + 2
    assert seen_types  # some objects exist


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_params_give_identical_bytes(tiny_corpus, tmp_path):
    """A second run, in one process instead of a pool, writes the very same files."""
    generate(params_with({"synthetic": {**TINY_SYNTHETIC, "workers": 1}}).synthetic, tmp_path, progress=False)
    assert _digest(tmp_path) == _digest(tiny_corpus)


def test_another_seed_gives_other_images(tmp_path):
    override = {"synthetic": {**TINY_SYNTHETIC, "seed": 1, "workers": 1}}
    a = generate(params_with(override).synthetic, tmp_path / "a", datasets=("rsna",), progress=False)
    override["synthetic"]["seed"] = 2
    b = generate(params_with(override).synthetic, tmp_path / "b", datasets=("rsna",), progress=False)
    assert a == b == {"rsna": 24}
    assert _digest(tmp_path / "a" / "rsna") != _digest(tmp_path / "b" / "rsna")


def test_a_dataset_s_bytes_do_not_depend_on_the_others_generated_with_it(tiny_corpus, tmp_path):
    """Each dataset draws from its own stream (DATASET_INDEX): objcxr alone gives the bytes it has beside the
    six others (NIH, added last, included), truth file and all."""
    generate(params_with({"synthetic": {**TINY_SYNTHETIC, "workers": 1}}).synthetic, tmp_path, datasets=("objcxr",),
             progress=False)  # fmt: skip
    assert _digest(tmp_path / "objcxr") == _digest(tiny_corpus / "objcxr")
    assert (tmp_path / "truth/objcxr.jsonl").read_bytes() == (tiny_corpus / "truth/objcxr.jsonl").read_bytes()


@pytest.mark.parametrize("ds", ["mimic", "rsna"])
def test_generation_replaces_a_previous_folder_whole(tmp_path, ds):
    stale = tmp_path / ds / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    generate(params_with({"synthetic": {**TINY_SYNTHETIC, "workers": 1}}).synthetic, tmp_path, datasets=(ds,), progress=False)
    assert not stale.exists() and any((tmp_path / ds).iterdir())

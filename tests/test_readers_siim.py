"""SIIM-ACR pneumothorax: the real train-rle.csv quirks, DICOM discovery and the stage-1 RLE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mflag.data.siim import decode_masks, read_siim, rle_decode
from mflag.data.table import DataError
from mflag.rle import rle_encode


def _reference_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Written differently on purpose: walk the runs pixel by pixel in column-major order."""
    out = np.zeros((height, width), dtype=np.uint8)
    values = [int(v) for v in rle.split()]
    cursor = 0
    for k in range(0, len(values), 2):
        cursor += values[k]
        for _ in range(values[k + 1]):
            row, col = cursor % height, cursor // height  # column-major: rows run fastest
            out[row, col] = 1
            cursor += 1
    return out


# A 4 x 5 mask drawn by hand (rows top to bottom).
HAND_MASK = np.array(
    [
        [0, 1, 0, 0, 0],
        [0, 1, 1, 0, 1],
        [0, 0, 1, 0, 1],
        [1, 0, 0, 0, 1],
    ],
    dtype=np.uint8,
)
# Column-major flat order: col0 = 0 0 0 1, col1 = 1 1 0 0, col2 = 0 1 1 0,
# col3 = 0 0 0 0, col4 = 0 1 1 1
# foreground indices 3,4,5 | 9,10 | 17,18,19 -> runs (3,3), (9,2), (17,3) -> relative 3 3 3 2 6 3
HAND_RLE = "3 3 3 2 6 3"


def test_rle_decode_hand_made():
    assert np.array_equal(rle_decode(HAND_RLE, 4, 5), HAND_MASK)
    assert np.array_equal(_reference_decode(HAND_RLE, 4, 5), HAND_MASK)
    assert rle_decode(HAND_RLE, 4, 5).dtype == np.uint8
    assert rle_encode(HAND_MASK) == HAND_RLE


def test_rle_decode_matches_reference_on_random_masks():
    rng = np.random.default_rng(0)
    for h, w in [(7, 3), (16, 16), (5, 11)]:
        for p in (0.1, 0.5, 0.9):
            m = (rng.random((h, w)) < p).astype(np.uint8)
            rle = rle_encode(m)
            assert np.array_equal(_reference_decode(rle, h, w), m)
            assert np.array_equal(rle_decode(rle, h, w), m)


def test_rle_empty_and_union():
    assert rle_encode(np.zeros((3, 3))) == "-1"
    assert not rle_decode(" -1", 3, 3).any()
    a = np.zeros((6, 6), np.uint8)
    a[1:3, 1:3] = 1
    b = np.zeros((6, 6), np.uint8)
    b[2:5, 2:4] = 1
    u = decode_masks([rle_encode(a), rle_encode(b)], 6, 6)
    assert np.array_equal(u, a | b)
    assert not decode_masks([], 6, 6).any()
    full = np.ones((2, 3), np.uint8)
    assert rle_encode(full) == "0 6"
    assert np.array_equal(rle_decode("0 6", 2, 3), full)


def test_rle_decode_rejects_overflow_and_garbage():
    with pytest.raises(DataError):
        rle_decode("10 5", 3, 3)
    with pytest.raises(DataError):
        rle_decode("1 2 3", 3, 3)
    with pytest.raises(DataError):
        rle_decode("a b", 3, 3)


# --------------------------------------------------------------------------- the reader


def _write_dicom(path: Path, patient_id: str | None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.Rows, ds.Columns = 4, 5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(20, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _img_id(n: int) -> str:
    return f"1.2.276.0.7230010.3.1.4.8323329.{n}.1517875188.95909{n}"


def test_read_siim(tmp_path):
    ids = {k: _img_id(k) for k in range(1, 7)}
    rle_a, rle_b = "3 3 3 2", "17 3"
    csv = (
        "ImageId, EncodedPixels\n"
        f"{ids[1]}, -1\n"
        f"{ids[2]}, {rle_a}\n"
        f"{ids[2]}, {rle_b}\n"
        f"{ids[3]}, -1\n"  # no DICOM on disk
        f"{ids[4]}, 5 x 7\n"  # malformed RLE
        f"{ids[6]}, {HAND_RLE}\n"
    )
    (tmp_path / "train-rle.csv").write_text(csv)
    base = tmp_path / "dicom-images-train"
    paths = {}
    for k in (1, 2, 4, 5, 6):
        study, series = generate_uid(entropy_srcs=[f"st{k}"]), generate_uid(entropy_srcs=[f"se{k}"])
        paths[k] = base / study / series / f"{ids[k]}.dcm"
        _write_dicom(paths[k], f"patient-{k}" if k != 6 else "patient-1")
    t = read_siim(tmp_path)
    assert list(t.rows.columns) == ["image_id", "patient_id", "path", "official_split", "target"]
    r = t.rows.set_index("image_id")
    assert sorted(r.index) == sorted([ids[1], ids[2], ids[6]])  # ids[5] has no CSV row
    assert r.loc[ids[1], "target"] == 0
    assert r.loc[ids[2], "target"] == 1
    assert r.loc[ids[2], "patient_id"] == "patient-2"
    assert r.loc[ids[6], "patient_id"] == "patient-1"  # from the DICOM header, not the file name
    assert r.loc[ids[2], "path"] == paths[2].relative_to(tmp_path).as_posix()
    assert set(r["official_split"]) == {""}
    assert t.excluded == {"not_in_csv": 1}
    assert t.rles == {ids[2]: [rle_a, rle_b], ids[6]: [HAND_RLE]}
    assert np.array_equal(decode_masks(t.rles[ids[2]], 4, 5), HAND_MASK)
    assert sorted(t.dropped) == sorted(
        [
            (f"dicom-images-train/{ids[3]}.dcm", "missing file"),
            (paths[4].relative_to(tmp_path).as_posix(), "bad label"),
        ]
    )


def test_siim_header_without_space_and_errors(tmp_path):
    with pytest.raises(DataError, match="train-rle.csv"):
        read_siim(tmp_path)
    (tmp_path / "train-rle.csv").write_text("ImageId,EncodedPixels\nabc,-1\n")
    with pytest.raises(DataError, match="dicom-images-train"):
        read_siim(tmp_path)
    _write_dicom(tmp_path / "dicom-images-train" / "s" / "r" / "abc.dcm", "p")
    assert read_siim(tmp_path).rows["image_id"].tolist() == ["abc"]
    (tmp_path / "train-rle.csv").write_text("ImageId, Pixels\nabc, -1\n")
    with pytest.raises(DataError, match=r"train-rle\.csv.*'EncodedPixels'"):
        read_siim(tmp_path)


def test_siim_patient_id_read_from_real_header(tmp_path):
    p = tmp_path / "x.dcm"
    _write_dicom(p, "17d405a3-a0d2-4901-b33a-63906aa48d9f")
    assert pydicom.dcmread(p).PatientID == "17d405a3-a0d2-4901-b33a-63906aa48d9f"

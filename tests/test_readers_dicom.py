"""DICOM / PNG / JPEG decoding to uint8 on tiny files written here with pydicom and PIL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from mflag.data.dicom import read_dicom_uint8
from mflag.data.images import read_image_uint8
from mflag.data.table import DataError


def _dataset(
    arr: np.ndarray,
    photometric="MONOCHROME2",
    bits_stored=None,
    signed=False,
    tsyntax=ExplicitVRLittleEndian,
):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tsyntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "p1"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    alloc = arr.dtype.itemsize * 8
    ds.BitsAllocated = alloc
    ds.BitsStored = bits_stored or alloc
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if tsyntax == ExplicitVRLittleEndian:
        ds.PixelData = arr.tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return np.rint((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


def test_monochrome2_without_window_is_minmax(tmp_path):
    arr = np.array([[10, 20, 30], [40, 50, 110]], dtype=np.uint8)
    out = read_dicom_uint8(_save(_dataset(arr), tmp_path / "a.dcm"))
    assert out.dtype == np.uint8 and out.shape == (2, 3)
    assert np.array_equal(out, _minmax(arr))
    assert out[0, 0] == 0 and out[1, 2] == 255


def test_monochrome1_is_inverted(tmp_path):
    arr = np.array([[0, 100], [200, 250]], dtype=np.uint8)
    out = read_dicom_uint8(_save(_dataset(arr, photometric="MONOCHROME1"), tmp_path / "m1.dcm"))
    assert np.array_equal(out, 255 - _minmax(arr))
    assert out[0, 0] == 255 and out[1, 1] == 0  # the lowest stored value is the brightest


def test_16bit_rescale_and_window(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 4096, size=(16, 16)).astype(np.uint16)
    raw[0, :4] = [0, 4095, 1024 + 20, 1024 + 200]
    slope, intercept, center, width = 1.0, -1024.0, 40.0, 400.0
    ds = _dataset(raw, bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.WindowCenter, ds.WindowWidth = center, width
    out = read_dicom_uint8(_save(ds, tmp_path / "ct.dcm"))
    # DICOM linear window (PS3.3 C.11.2.1.2.1) on the modality values, 0..1 mapped to 0..255
    hu = raw.astype(np.float64) * slope + intercept
    frac = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    expected = np.rint(frac * 255)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert np.mean(out == expected) > 0.95
    assert out[0, 0] == 0 and out[0, 1] == 255
    # a window narrower than the data must saturate, not be stretched to the image's min/max
    assert ((out == 0) | (out == 255)).mean() > 0.5


def test_16bit_window_monochrome1(tmp_path):
    raw = np.array([[0, 1000], [2000, 3000]], dtype=np.uint16)
    ds = _dataset(raw, photometric="MONOCHROME1", bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 1500.0, 2001.0
    out = read_dicom_uint8(_save(ds, tmp_path / "w1.dcm"))
    frac = np.clip((raw - 1499.5) / 2000.0 + 0.5, 0, 1)
    assert np.abs(out.astype(int) - (255 - np.rint(frac * 255)).astype(int)).max() <= 1


def test_voi_lut_sequence(tmp_path):
    from pydicom.sequence import Sequence

    raw = np.array([[0, 100], [200, 4000]], dtype=np.uint16)
    item = Dataset()
    # 256 entries, first mapped value 0, 16-bit output
    item.add_new(0x00283002, "US", [256, 0, 16])  # LUTDescriptor
    item.add_new(0x00283006, "OW", (np.arange(256, dtype="<u2") * 200).tobytes())  # LUTData
    ds = _dataset(raw, bits_stored=12)
    ds.VOILUTSequence = Sequence([item])
    out = read_dicom_uint8(_save(ds, tmp_path / "lut.dcm"))
    # LUT output 0, 20000, 40000, 51000 (input past the table clamps to its last entry)
    assert out.tolist() == [[0, 100], [200, 255]]


def _jpeg_dicom(img: np.ndarray, path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=95)
    ds = _dataset(img, tsyntax=JPEGBaseline8Bit)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    return _save(ds, path)


def _gradient(h=64, w=48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.clip(x * 255 / (w - 1) * 0.6 + y * 255 / (h - 1) * 0.4, 0, 255).astype(np.uint8)


def test_jpeg_baseline_encapsulated(tmp_path):
    img = _gradient()
    p = _jpeg_dicom(img, tmp_path / "jpeg.dcm")
    out = read_dicom_uint8(p)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 3
    assert np.array_equal(read_image_uint8(p), out)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncated_and_missing_dicom(tmp_path):
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    p = _save(_dataset(raw), tmp_path / "full.dcm")
    data = p.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.dcm"):
        read_dicom_uint8(cut)
    jp = _jpeg_dicom(_gradient(), tmp_path / "jfull.dcm")
    jdata = jp.read_bytes()
    jcut = tmp_path / "jcut.dcm"
    jcut.write_bytes(jdata[: len(jdata) - 400])
    with pytest.raises(DataError, match="jcut.dcm"):
        read_image_uint8(jcut)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a dicom at all")
    with pytest.raises(DataError, match="garbage.dcm"):
        read_dicom_uint8(garbage)
    with pytest.raises(DataError, match="nothere.dcm"):
        read_image_uint8(tmp_path / "nothere.dcm")


def test_png_and_jpeg_files(tmp_path):
    g = _gradient()
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    assert np.array_equal(read_image_uint8(tmp_path / "g.png"), g)
    rgb = np.stack([g, g, g], axis=-1)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    assert np.abs(read_image_uint8(tmp_path / "rgb.png").astype(int) - g).max() <= 1
    Image.fromarray(g, mode="L").save(tmp_path / "g.jpg", quality=95)
    assert np.abs(read_image_uint8(tmp_path / "g.jpg").astype(int) - g).mean() < 3
    sixteen = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000 + 500).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s16.png")
    out = read_image_uint8(tmp_path / "s16.png")
    assert out.dtype == np.uint8 and np.array_equal(out, _minmax(sixteen))


def test_truncated_and_missing_images(tmp_path):
    g = np.random.default_rng(0).integers(0, 256, size=(128, 128)).astype(np.uint8)
    Image.fromarray(g, mode="L").save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        read_image_uint8(tmp_path / "cut.jpg")
    Image.fromarray(g, mode="L").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png"):
        read_image_uint8(tmp_path / "cut.png")
    with pytest.raises(DataError, match="missing.png"):
        read_image_uint8(tmp_path / "missing.png")

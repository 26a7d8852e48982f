"""Byte-deterministic writers for the corpus' files: JPEG/PNG (grey or RGBA) images, DICOM, gzipped CSV.

Every writer goes through a temporary file and an atomic rename, and nothing here embeds a time
stamp or a random UID, so the same pixels always give the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage

from mflag.io import atomic_write as atomic_write_bytes  # one atomic writer for the whole project

UID_ROOT = "1.2.276.0.7230010.3.1"  # the prefix the RSNA and SIIM files carry


def stable_hex(*parts, n: int = 32) -> str:
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:n]


def stable_uid(*parts) -> str:
    """A DICOM UID (digits and dots, <= 64 chars) derived from `parts` alone."""
    h = stable_hex(*parts, n=24)
    return f"{UID_ROOT}.4.{int(h[:8], 16)}.{int(h[8:], 16)}"  # int() leaves no leading zero, as UIDs require


def encode_image(img: np.ndarray, fmt: str, quality: int = 90, rgba: bool = False) -> bytes:
    """`img` (H, W) uint8 as PNG or JPEG bytes; `rgba` (PNG only): grey replicated to RGB, alpha opaque."""
    buf = io.BytesIO()
    if fmt == "png":
        if rgba:
            img = np.dstack([img, img, img, np.full_like(img, 255)])
        Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    else:  # baseline (non-progressive) JPEG, as DICOM JPEG-Baseline and the datasets' .jpg files are
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, progressive=False, optimize=False)
    return buf.getvalue()


def write_image(path: Path, img: np.ndarray, rgba: bool = False) -> None:
    png = path.suffix.lower() == ".png"
    if rgba and not png:
        raise ValueError(f"{path}: only a PNG can be written as RGBA")
    atomic_write_bytes(path, encode_image(img, "png" if png else "jpg", rgba=rgba))


def dicom_bytes(
    img: np.ndarray,
    *,
    patient_id: str,
    sex: str,
    age: int,
    view: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    encoding: str = "jpeg",
    monochrome1: bool = False,
) -> bytes:
    """A chest radiograph as a DICOM file.

    encoding: "jpeg" (8-bit JPEG-Baseline, encapsulated, as RSNA and SIIM ship) or "raw16" (16-bit
    uncompressed with a rescale and a VOI window, so a reader must apply both LUTs to see the image).
    monochrome1 stores the image inverted (low value = dense) and says so.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.ImplementationClassUID = f"{UID_ROOT}.0.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyDescription = f"view: {view}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = int(img.shape[0]), int(img.shape[1])
    ds.PixelSpacing = [0.168, 0.168]
    ds.PixelRepresentation = 0
    stored = 255 - img if monochrome1 else img
    if encoding == "jpeg":
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([encode_image(stored, "jpg", quality=90)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif encoding == "raw16":
        # value = slope * raw + intercept; the VOI window maps values [100, 610] back to 0..255;
        # raw values stay within the 12 stored bits
        slope, intercept = 0.5, -1024.0
        value = stored.astype(np.float64) * 2.0 + 100.0
        raw = np.round((value - intercept) / slope).astype(np.uint16)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.RescaleType = "US"
        ds.WindowCenter, ds.WindowWidth = 100.0 + 255.0, 2.0 * 255 + 1.0
        ds.PixelData = raw.tobytes()
        ds["PixelData"].VR = "OW"
    else:
        raise ValueError(f"unknown DICOM encoding {encoding!r}")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def csv_bytes(header: list[str], rows: list[list], delimiter: str = ",", with_header: bool = True) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    if with_header:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def gzip_bytes(data: bytes) -> bytes:
    """gzip without a file name or time stamp in its header, so the bytes depend on `data` alone."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def fmt_label(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"

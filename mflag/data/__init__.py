"""Readers for the on-disk layouts of the six chest X-ray datasets, and image decoding."""

from .chexpert import read_chexpert
from .covidx import read_covidx
from .dicom import read_dicom_uint8
from .images import read_image_uint8
from .mimic import report_text, read_mimic, section_report
from .objcxr import read_objcxr
from .rsna import read_rsna
from .siim import decode_masks, read_siim, rle_decode, rle_encode
from .table import DataError, DatasetTable

# The split file's label columns per dataset (CONTRACTS.md), used to stratify the nested fractions.
LABEL_COLUMNS: dict[str, tuple[str, ...]] = {
    "mimic": (),
    "chexpert": ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"),
    "rsna": ("target",),
    "siim": ("target",),
    "covidx": ("label",),
    "objcxr": ("target",),
}

READERS = {
    "mimic": read_mimic,
    "chexpert": read_chexpert,
    "rsna": read_rsna,
    "siim": read_siim,
    "covidx": read_covidx,
    "objcxr": read_objcxr,
}

__all__ = [
    "LABEL_COLUMNS",
    "READERS",
    "DataError",
    "DatasetTable",
    "decode_masks",
    "read_chexpert",
    "read_covidx",
    "read_dicom_uint8",
    "read_image_uint8",
    "read_mimic",
    "read_objcxr",
    "read_rsna",
    "read_siim",
    "report_text",
    "rle_decode",
    "rle_encode",
    "section_report",
]

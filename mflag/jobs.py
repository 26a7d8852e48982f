"""The downstream job table: the one place that says which jobs exist and what each one is.

Every job is fine-tuned at each data fraction from each encoder the study compares (params ``encoders``).
A job is named ``<task>_<dataset>``: dvc.yaml's stage ``finetune_<task>`` runs it for each of its datasets
and encoders (``finetune_<task>@<dataset>-<encoder>``). The stage, collation, dvc.yaml's fine-tune stages
and the tests all derive from this table (``tests/test_stage_deps.py`` checks dvc.yaml against it).
"""

from __future__ import annotations

from typing import NamedTuple


class Job(NamedTuple):
    name: str  # cls_chexpert, ...
    task: str  # cls | seg | det: the evaluator (and the params section finetune.<task>)
    dataset: str  # the dataset key whose cache it reads
    metric: str  # the key its cells write and collate reads (docs/contracts.md, "Metrics")
    label: str  # the dataset's name in tables and plots


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job("cls_chexpert", "cls", "chexpert", "auc", "CheXpert"),
        Job("cls_rsna", "cls", "rsna", "auc", "RSNA"),
        Job("cls_covidx", "cls", "covidx", "acc", "COVIDx"),
        Job("cls_nih", "cls", "nih", "auc", "NIH ChestX-ray14"),
        Job("seg_siim", "seg", "siim", "dice", "SIIM"),
        Job("seg_rsna", "seg", "rsna", "dice", "RSNA"),
        Job("det_rsna", "det", "rsna", "map", "RSNA"),
        Job("det_objcxr", "det", "objcxr", "map", "Object-CXR"),
    )
}
TASK_TABLES = {"cls": "classification", "seg": "segmentation", "det": "detection"}  # the paper's tables
PCTS = (1, 10, 100)  # train fractions, percent (nested subsets)


def cell_name(job: str, pct: int, encoder: str) -> str:
    """The folder of one cell's results under reports/finetune/."""
    return f"{job}-{pct}-{encoder}"

"""The collate stage on hand-made cells, checked against the test's own reading of the outputs.

Every input is written into a temporary project folder (cells with their bootstrap replicates, both pretraining
runs, the references and the paper configuration); nothing under the repository's reports/ is read or written.
Intervals are checked against numpy's percentiles of the replicates the test wrote; the job / metric / column
names below are the test's own copy of the contract.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mflag import collate
from tests.conftest import REPO

JOB_METRIC = {"cls_chexpert": "auc", "cls_rsna": "auc", "cls_covidx": "acc", "cls_nih": "auc", "seg_siim": "dice",
              "seg_rsna": "dice", "det_rsna": "map", "det_objcxr": "map"}  # fmt: skip
PCTS = (1, 10, 100)
COLUMNS = {  # table -> (job, header prefix)
    "classification": [("cls_chexpert", "CheXpert AUC"), ("cls_rsna", "RSNA AUC"), ("cls_covidx", "COVIDx ACC"),
                       ("cls_nih", "NIH ChestX-ray14 AUC")],
    "segmentation": [("seg_siim", "SIIM Dice"), ("seg_rsna", "RSNA Dice")],
    "detection": [("det_rsna", "RSNA mAP"), ("det_objcxr", "Object-CXR mAP")],
}
LABELS = {"mflag": "M-FLAG", "convirt": "ConVIRT-style", "random": "Random", "imagenet": "ImageNet"}
ENCODERS = ("mflag", "convirt", "random")
B = 200  # resamples
PRETRAIN = {"loss_total": 857.6, "loss_align": 1.8, "loss_ortho": 855.8, "i2t_r1": 0.0093, "i2t_r5": 0.046,
            "i2t_r10": 0.10, "t2i_r1": 0.0093, "t2i_r5": 0.056, "t2i_r10": 0.093, "effective_rank": 89.2,
            "mean_abs_offdiag_corr": 0.111, "valid_images": 108, "params_total": 55410624,
            "params_trainable": 32697408, "params_frozen": 22713216}  # fmt: skip
CONVIRT = {**{k: v for k, v in PRETRAIN.items() if k not in ("loss_align", "loss_ortho")}, "loss_total": 3.1,
           "loss_infonce": 3.1, "params_trainable": 38000000, "params_frozen": 17410624}  # fmt: skip
TIMING = {"pretrain": {"images_per_second": 40.0, "device": "cpu", "precision": "bf16"},
          "pretrain_convirt": {"images_per_second": 25.0, "device": "cpu", "precision": "bf16",
                               "text_precompute_seconds": 12.0}}  # fmt: skip
OUTPUTS = [
    "metrics.json",
    "claims.md",
    *[f"tables/{t}.{ext}" for t in (*COLUMNS, "pretraining") for ext in ("md", "tex", "csv")],
    *[f"tables/{t}_differences.{ext}" for t in COLUMNS for ext in ("md", "csv")],
    *[f"plots/fraction/{j}.csv" for j in JOB_METRIC],
    *[f"plots/{name}.png" for name in ("fraction", "losses", "spectrum")],
]


def all_cells(encoders=ENCODERS, seed=0) -> dict:
    rng = random.Random(seed)
    return {(j, p, e): rng.uniform(0.3, 0.95) for j in JOB_METRIC for p in PCTS for e in encoders}


def replicates_for(cells: dict, spread: float = 0.02, seed: int = 0) -> dict:
    """Replicates around each cell's value: a shared per-resample shift (the test cases drawn, common to every
    encoder of a job) plus the encoder's own noise, as paired replicates look."""
    rng = np.random.default_rng(seed)
    shared = {j: rng.normal(0, spread, B) for j in JOB_METRIC}
    return {k: v + shared[k[0]] + rng.normal(0, spread / 4, B) for k, v in cells.items() if v is not None}


def write_cell(root: Path, job: str, pct: int, enc: str, value, reps, test_set: str = "t0", **extra) -> Path:
    rec = {"job": job, "pct": pct, "encoder": enc, JOB_METRIC[job]: value, "best_epoch": 3, "n_train": 16 * pct,
           "test_cases": 50, "test_set": test_set, "bootstrap": {"resamples": B, "seed": 42, "key": job},
           "params": {"seed": 42}, **extra}  # fmt: skip
    folder = root / f"reports/finetune/{job}-{pct}-{enc}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(rec, indent=2))
    lines = ["" if reps is None or np.isnan(r) else repr(float(r)) for r in (reps if reps is not None else [None] * B)]
    (folder / "bootstrap.csv").write_text(JOB_METRIC[job] + "\n" + "".join(x + "\n" for x in lines))
    return folder / "metrics.json"


def make_project(root: Path, cells: dict, reps: dict | None = None, encoders=ENCODERS) -> Path:
    """A project folder with the collate stage's inputs, as the other stages write them."""
    reps = replicates_for(cells) if reps is None else reps
    for (job, pct, enc), value in cells.items():
        write_cell(root, job, pct, enc, value, reps.get((job, pct, enc)))
    for run, metrics, cols in (("pretrain", PRETRAIN, "align,ortho,total"), ("pretrain_convirt", CONVIRT, "infonce,total")):
        pre = root / "reports" / run
        pre.mkdir(parents=True, exist_ok=True)
        (pre / "metrics.json").write_text(json.dumps({**metrics, "history": [1, 2]}))
        n = len(cols.split(","))
        (pre / "losses.csv").write_text(f"step,epoch,{cols},lr\n5,1,{','.join(['4.0'] * n)},1e-3\n"
                                        f"10,1,{','.join(['3.0'] * n)},8e-4\n")  # fmt: skip
        (pre / "spectrum.csv").write_text("index,singular_value\n0,2.4\n1,2.1\n2,1.6\n")
        (pre / "timing.json").write_text(json.dumps(TIMING[run]))
    for rel in ("references/paper_reference.yaml", "configs/paper.yaml"):
        (root / rel).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    imagenet = {"kind": "imagenet", "weights": "models/imagenet/resnet50.pth", "key_prefix": "",
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    params["encoders"] = {e: params["encoders"].get(e, imagenet) for e in encoders}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def collated(root: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the stage in `root`."""
    proc = subprocess.run([sys.executable, str(REPO / "stages/collate.py")], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        assert "." not in k, k
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def md_rows(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """A markdown table: (headers without the first, {first cell: other cells})."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0][1:], {row[0]: row[1:] for row in split[2:]}


def pct_interval(values: np.ndarray) -> tuple[float, float]:
    """The reference: numpy's 2.5 and 97.5 percentiles."""
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One collated project with three encoders, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("collate")
    cells = all_cells()
    reps = replicates_for(cells)
    make_project(root, cells, reps)
    proc = collated(root)
    return root, cells, reps, proc


# ------------------------------------------------------------------------------------------ tests
def test_job_table_metrics_are_the_contract():
    """The job table (mflag/jobs.py) against the metric keys docs/contracts.md fixes."""
    from mflag.jobs import JOBS

    assert collate.JOBS is JOBS
    assert {j: s.metric for j, s in JOBS.items()} == JOB_METRIC


def test_metrics_keys_values_intervals_and_paired_differences(run):
    root, cells, reps, _ = run
    flat = flatten(json.loads((root / "reports/metrics.json").read_text()))
    for (j, p, e), v in cells.items():
        m, at = JOB_METRIC[j], f"{j}.{e}.pct{p}"
        assert flat[f"{at}.{m}"] == float(f"{v:.10g}")  # fractions, 10 significant digits
        lo, hi = pct_interval(reps[(j, p, e)])
        assert flat[f"{at}.{m}_lo"] == pytest.approx(lo, abs=1e-9) and flat[f"{at}.{m}_hi"] == pytest.approx(hi, abs=1e-9)
        for other in ENCODERS:
            if other == e:
                assert not any(k.startswith(f"{at}.vs_{e}.") for k in flat)
                continue
            lo, hi = pct_interval(reps[(j, p, e)] - reps[(j, p, other)])
            assert flat[f"{at}.vs_{other}.{m}_diff"] == pytest.approx(v - cells[(j, p, other)], abs=1e-9)
            assert flat[f"{at}.vs_{other}.{m}_diff_lo"] == pytest.approx(lo, abs=1e-9)
            assert flat[f"{at}.vs_{other}.{m}_diff_hi"] == pytest.approx(hi, abs=1e-9)
    per_cell = {"", "_lo", "_hi"} | {f"{d}{s}" for d in ("vs_a.", "vs_b.") for s in ("_diff", "_diff_lo", "_diff_hi")}
    assert len([k for k in flat if not k.startswith("pretrain")]) == len(cells) * len(per_cell)
    assert {k for k in flat if k.startswith("pretrain.")} == {f"pretrain.{k}" for k in PRETRAIN}
    assert {k for k in flat if k.startswith("pretrain_convirt.")} == {f"pretrain_convirt.{k}" for k in CONVIRT}


def test_tables_show_value_interval_and_bold_on_the_column_maximum(run):
    root, cells, reps, _ = run
    for table, cols in COLUMNS.items():
        heads, rows = md_rows((root / f"reports/tables/{table}.md").read_text())
        assert heads == [f"{prefix} {p}%" for _, prefix in cols for p in PCTS]
        for c, ((job, _), p) in enumerate((col, p) for col in cols for p in PCTS):
            best = max(ENCODERS, key=lambda e: cells[(job, p, e)])
            for e in ENCODERS:
                lo, hi = pct_interval(reps[(job, p, e)])
                text = f"{100 * cells[(job, p, e)]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                assert rows[LABELS[e]][c] == (f"**{text}**" if e == best else text)
        csv = pd.read_csv(root / f"reports/tables/{table}.csv").set_index("encoder")
        job, prefix = cols[0]
        assert csv.loc["mflag", f"{prefix} 1%"] == round(100 * cells[(job, 1, "mflag")], 1)
        assert csv.loc["mflag", f"{prefix} 1% lo"] == round(100 * pct_interval(reps[(job, 1, "mflag")])[0], 1)


def test_differences_tables_mark_exactly_the_intervals_that_exclude_zero(tmp_path):
    cells = {k: 0.7 for k in all_cells()}
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 0.03, B)
    reps = {k: 0.7 + shared + rng.normal(0, 0.005, B) for k in cells}
    cells[("cls_rsna", 10, "mflag")] = 0.8
    reps[("cls_rsna", 10, "mflag")] = 0.8 + shared + rng.normal(0, 0.005, B)  # clearly ahead: paired
    make_project(tmp_path, cells, reps)
    collated(tmp_path)
    heads, rows = md_rows((tmp_path / "reports/tables/classification_differences.md").read_text())
    assert set(rows) == {"M-FLAG - ConVIRT-style", "M-FLAG - Random", "ConVIRT-style - Random"}
    for label, values in rows.items():
        for h, text in zip(heads, values):
            a, b = label.split(" - ")
            ahead = h == "RSNA AUC 10%" and a == "M-FLAG"
            assert text.endswith("*") == ahead, (label, h, text)
            assert text.startswith("+10.0") if ahead else text.startswith(("+0.0", "-0.0")), (label, h, text)
    csv = pd.read_csv(tmp_path / "reports/tables/classification_differences.csv")
    assert csv["RSNA AUC 10% excludes_0"].tolist() == [1, 1, 0]


def test_reference_rows_hold_only_sourced_values_in_their_columns(run):
    root, *_ = run
    ref = yaml.safe_load((REPO / "references/paper_reference.yaml").read_text())
    assert {row["kind"] for row in ref["rows"]} == {"published", "independent"}  # both kinds are on file
    for row in ref["rows"]:
        for table, cols in COLUMNS.items():
            text = (root / f"reports/tables/{table}.md").read_text()
            heads, rows = md_rows(text)
            jobs = {j for j, _ in cols}
            if not jobs & set(row["values"]):
                assert row["label"] not in text
                continue
            if "metric" in row:  # another metric: a note with every figure, never a row of the table
                assert not [k for k in rows if k.startswith(row["label"])]
                (note,) = [line for line in text.splitlines() if row["label"] in line]
                assert f"({row['metric']})" in note and row["source"] in note
                for (job, prefix) in cols:
                    for value in row["values"].get(job, {}).values():
                        assert f"{value:.1f}" in note, (job, value)
                assert ("Independent re-evaluation of M-FLAG" in note) == (row["kind"] == "independent")
                continue
            (label,) = [k for k in rows if k.startswith(row["label"])]
            for c, ((job, _), p) in enumerate((col, p) for col in cols for p in PCTS):
                want = row["values"].get(job, {}).get(f"pct{p}")
                assert rows[label][c] == ("" if want is None else f"{want:.1f}")
            assert row["source"] in text  # the exact source, in the note
            independent = f"Independent re-evaluation of M-FLAG. {row['label']}:"
            assert (independent in text) == (row["kind"] == "independent")
    assert "M-FLAG paper" not in json.dumps(ref)  # nothing from elsewhere under the paper's name


@pytest.mark.parametrize("change, message", [
    ({"kind": "reprint"}, "kind: one of published, independent"),
    ({"metric": "AUC"}, "is the job's own metric"),
    ({"kind": None}, "must hold key, label, kind"),
    ({"extra": 1}, "may hold metric"),
])  # fmt: skip
def test_a_reference_row_with_a_bad_kind_or_metric_is_refused_with_the_row_named(tmp_path, change, message):
    path = tmp_path / "ref.yaml"
    row = {"key": "k", "label": "L", "kind": "independent", "source": "S", "protocol": "P",
           "values": {"cls_rsna": {"pct1": 50.0}}}  # fmt: skip
    row.update(change)
    row = {k: v for k, v in row.items() if v is not None}
    path.write_text(yaml.safe_dump({"rows": [row]}))
    with pytest.raises(collate.CollateError, match=r"rows\[0\]") as err:
        collate.read_reference(path)
    assert message in str(err.value)


def test_missing_cells_render_as_dashes_and_warn(tmp_path):
    cells = all_cells()
    del cells[("seg_siim", 10, "convirt")]
    make_project(tmp_path, cells)
    proc = collated(tmp_path)
    assert "seg_siim-10-convirt" in proc.stderr
    _, rows = md_rows((tmp_path / "reports/tables/segmentation.md").read_text())
    assert rows["ConVIRT-style"][1] == "-"
    _, diffs = md_rows((tmp_path / "reports/tables/segmentation_differences.md").read_text())
    assert diffs["M-FLAG - ConVIRT-style"][1] == "-"


def test_a_listed_encoder_adds_its_row_and_an_unlisted_folder_is_ignored(tmp_path):
    cells = all_cells((*ENCODERS, "imagenet"))
    make_project(tmp_path, cells, encoders=(*ENCODERS, "imagenet"))
    write_cell(tmp_path, "cls_rsna", 1, "old", 0.99, None)  # an earlier experiment's encoder, no longer listed
    collated(tmp_path)
    _, rows = md_rows((tmp_path / "reports/tables/classification.md").read_text())
    assert [k for k in rows if "[^ref" not in k] == [LABELS[e] for e in (*ENCODERS, "imagenet")]  # then references
    plot = pd.read_csv(tmp_path / "reports/plots/fraction/cls_rsna.csv")
    assert list(plot.columns) == ["pct", "encoder", "value", "lo", "hi"]
    assert set(plot["encoder"]) == {*ENCODERS, "imagenet"}
    assert plot.set_index(["encoder", "pct"]).loc[("imagenet", 100), "value"] == float(
        f"{cells[('cls_rsna', 100, 'imagenet')]:.10g}")


def _claims(root: Path) -> dict[str, str]:
    text = (root / "reports/claims.md").read_text()
    return {s.split(":", 1)[0].split()[0]: s for s in text.split("## ")[1:]}


def test_claim_b_counts_ahead_only_where_the_paired_interval_excludes_zero(tmp_path):
    cells = {k: (0.8 if k[2] == "mflag" else 0.6) for k in all_cells()}
    rng = np.random.default_rng(2)
    shared = {j: rng.normal(0, 0.02, B) for j in JOB_METRIC}
    reps = {k: v + shared[k[0]] + rng.normal(0, 0.005, B) for k, v in cells.items()}
    make_project(tmp_path, cells, reps)
    collated(tmp_path)
    n = len(JOB_METRIC) * len(PCTS) * (len(ENCODERS) - 1)  # comparisons: job x fraction x other encoder
    assert "**supported**" in _claims(tmp_path)["(b)"] and f"ahead in {n}" in _claims(tmp_path)["(b)"]
    # one comparison within chance: M-FLAG 0.61 vs ConVIRT 0.6 with wide unshared noise
    cells[("det_rsna", 1, "mflag")] = 0.61
    reps[("det_rsna", 1, "mflag")] = 0.61 + rng.normal(0, 0.05, B)
    make_project(tmp_path, cells, reps)
    collated(tmp_path)
    b = _claims(tmp_path)["(b)"]
    assert "**not supported**" in b and f"ahead in {n - 2}" in b and "within chance in 2" in b
    assert "- det_rsna at 1% vs ConVIRT-style: +1.0" in b
    # both at 0 on every resample (a detector that finds nothing): equal, not "within chance"
    for enc in ENCODERS:
        cells[("det_objcxr", 10, enc)] = 0.0
        reps[("det_objcxr", 10, enc)] = np.zeros(B)
    make_project(tmp_path, cells, reps)
    collated(tmp_path)
    b = _claims(tmp_path)["(b)"]
    assert "equal on every resample in 2" in b and "- det_objcxr at 10% vs Random: +0.0 [+0.0, +0.0] points" in b


def test_claim_c_needs_an_imagenet_encoder_and_uses_the_paired_interval(tmp_path):
    cells = all_cells()
    make_project(tmp_path, cells)
    collated(tmp_path)
    assert "**not evaluable**" in _claims(tmp_path)["(c)"] and "`imagenet`" in _claims(tmp_path)["(c)"]
    cells = all_cells((*ENCODERS, "imagenet"))
    cells[("seg_rsna", 1, "mflag")], cells[("seg_rsna", 100, "imagenet")] = 0.75, 0.70
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 0.02, B)
    reps = replicates_for(cells)
    reps[("seg_rsna", 1, "mflag")] = 0.75 + shared + rng.normal(0, 0.003, B)
    reps[("seg_rsna", 100, "imagenet")] = 0.70 + shared + rng.normal(0, 0.003, B)
    make_project(tmp_path, cells, reps, encoders=(*ENCODERS, "imagenet"))
    collated(tmp_path)
    c = _claims(tmp_path)["(c)"]
    lo, hi = pct_interval(reps[("seg_rsna", 1, "mflag")] - reps[("seg_rsna", 100, "imagenet")])
    assert "**supported**" in c and f"+5.0 [{100 * lo:+.1f}, {100 * hi:+.1f}]*" in c


def test_claims_a_and_d_compare_the_two_runs_and_the_paper_configuration(run):
    import torchvision

    root, *_ = run
    claims = _claims(root)
    a, d = claims["(a)"], claims["(d)"]
    assert "M-FLAG trains 32,697,408 parameters, the ConVIRT-style baseline 38,000,000 (14.0% fewer" in a
    # reference: torchvision's ResNet-50 without fc; BERT-base layer 4(768^2 + 768) + 2(768 x 3072) + 3072 + 768
    # + 2 x 2 x 768 (two LayerNorms); projectors Linear-BN-ReLU-Linear-BN(no affine)
    trunk = sum(p.numel() for n, p in torchvision.models.resnet50().named_parameters() if not n.startswith("fc."))
    layer = 4 * (768 * 768 + 768) + 768 * 3072 + 3072 + 3072 * 768 + 768 + 2 * 2 * 768

    def proj(d_in: int) -> int:
        return d_in * 2048 + 2048 + 2 * 2048 + 2048 * 1024 + 1024

    mflag = trunk + proj(2048) + proj(768)
    assert f"M-FLAG trains {mflag:,}" in a and f"{mflag + 110_000_000:,}" in a and f"{mflag + 6 * layer:,}" in a
    assert f"({100 * (1 - mflag / (mflag + 110_000_000)):.1f}% fewer for M-FLAG; paper: 78%" in a
    assert "**supported**" in a  # 77.x% against a method that trains its whole LM, within 2 points of 78%
    assert "**supported**" in d and "M-FLAG 40.0 images/s (cpu, bf16)" in d and "ratio of 1.60" in d


def test_pretraining_table_has_both_runs(run):
    root, *_ = run
    heads, rows = md_rows((root / "reports/tables/pretraining.md").read_text())
    assert heads == ["quantity", "M-FLAG", "ConVIRT-style"]
    assert rows["parameters"] != rows.get("loss")
    text = (root / "reports/tables/pretraining.md").read_text()
    assert "| parameters | trainable | 32,697,408 | 38,000,000 |" in text
    assert "| loss | InfoNCE (ConVIRT-style) | - | 3.1000 |" in text


def test_outputs_are_byte_identical_across_runs(run, tmp_path):
    root, *_ = run
    first = {p: (root / "reports" / p).read_bytes() for p in OUTPUTS}
    shutil.copytree(root, tmp_path / "again")
    shutil.rmtree(tmp_path / "again/reports/tables")
    collated(tmp_path / "again")
    assert {p: (tmp_path / "again/reports" / p).read_bytes() for p in OUTPUTS} == first


def test_cells_of_one_job_on_other_test_cases_cannot_be_paired(tmp_path):
    make_project(tmp_path, all_cells())
    path = write_cell(tmp_path, "cls_rsna", 10, "random", 0.5, np.full(B, 0.5), test_set="other")
    proc = collated(tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(path.relative_to(tmp_path)) in proc.stderr and "cannot be paired" in proc.stderr


@pytest.mark.parametrize("token", ["NaN", "Infinity"])
def test_a_nan_token_in_a_cell_is_rejected_with_the_file_named(tmp_path, token):
    make_project(tmp_path, all_cells())
    path = tmp_path / "reports/finetune/seg_rsna-10-mflag/metrics.json"
    path.write_text(path.read_text().replace('"dice": 0.', f'"dice": {token}, "x": 0.'))
    proc = collated(tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "reports/finetune/seg_rsna-10-mflag/metrics.json" in proc.stderr and token in proc.stderr


def test_a_null_metric_is_na_everywhere_with_its_reason(tmp_path):
    cells = all_cells()
    make_project(tmp_path, cells)
    write_cell(tmp_path, "det_objcxr", 1, "convirt", None, None, not_evaluable="the test subset holds no box")
    proc = collated(tmp_path)
    assert "det_objcxr-1-convirt (the test subset holds no box)" in proc.stderr
    flat = flatten(json.loads((tmp_path / "reports/metrics.json").read_text()))
    assert flat["det_objcxr.convirt.pct1.map"] is None and "det_objcxr.convirt.pct1.map_lo" not in flat
    assert "det_objcxr.mflag.pct1.vs_convirt.map_diff" not in flat
    _, rows = md_rows((tmp_path / "reports/tables/detection.md").read_text())
    assert rows["ConVIRT-style"][3] == "n/a"
    assert "det_objcxr at 1% vs ConVIRT-style: a metric not evaluable" in _claims(tmp_path)["(b)"]
    write_cell(tmp_path, "det_objcxr", 1, "convirt", None, None)  # null without a reason
    proc = collated(tmp_path, check=False)
    assert proc.returncode != 0 and "without a `not_evaluable` reason" in proc.stderr


def test_a_bootstrap_file_of_the_wrong_length_is_an_error(tmp_path):
    make_project(tmp_path, all_cells())
    path = tmp_path / "reports/finetune/cls_covidx-1-random/bootstrap.csv"
    path.write_text("acc\n0.5\n")
    proc = collated(tmp_path, check=False)
    assert proc.returncode != 0 and "cls_covidx-1-random/bootstrap.csv" in proc.stderr and "200 lines" in proc.stderr


def test_missing_pretrain_timing_exits_with_the_file_name(tmp_path):
    make_project(tmp_path, all_cells())
    (tmp_path / "reports/pretrain_convirt/timing.json").unlink()
    proc = collated(tmp_path, check=False)
    assert proc.returncode != 0 and "reports/pretrain_convirt/timing.json" in proc.stderr
    assert "dvc repro pretrain_convirt" in proc.stderr


def test_the_constant_predictors_scores_are_a_row_of_each_table(tmp_path):
    """Each cell's `trivial` (mflag.finetune.checks.trivial_score) becomes the "Constant predictor" row, in percent;
    a job whose cells wrote none shows blanks; a non-number is an error naming the file."""
    cells = all_cells()
    reps = replicates_for(cells)
    make_project(tmp_path, cells, reps)
    floors = {("seg_siim", 1): 0.7147, ("seg_siim", 10): 0.7147, ("seg_siim", 100): 0.7147, ("seg_rsna", 100): 0.61}
    for (job, pct, enc), value in cells.items():
        if (job, pct) in floors:
            write_cell(tmp_path, job, pct, enc, value, reps[(job, pct, enc)], trivial=floors[(job, pct)])
    collated(tmp_path)
    text = (tmp_path / "reports/tables/segmentation.md").read_text()
    heads, rows = md_rows(text)
    assert heads[:3] == ["SIIM Dice 1%", "SIIM Dice 10%", "SIIM Dice 100%"]
    (label,) = [k for k in rows if k.startswith("Constant predictor")]
    assert rows[label] == ["71.5", "71.5", "71.5", "", "", "61.0"]
    assert "model that learned nothing" in text
    assert "Constant predictor" not in (tmp_path / "reports/tables/detection.md").read_text()

    path = write_cell(tmp_path, "seg_rsna", 1, "mflag", 0.5, reps[("seg_rsna", 1, "mflag")], trivial="high")
    proc = collated(tmp_path, check=False)
    assert proc.returncode != 0 and str(path.relative_to(tmp_path)) in proc.stderr and "`trivial`" in proc.stderr

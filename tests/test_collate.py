"""The collate stage on hand-made cell metrics, checked against the test's own reading of the outputs.

Every input is written into a temporary project folder; nothing under the repository's reports/ is read
or written. The job / metric / column names below are the test's own copy of the contract.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mflag import collate
from tests.conftest import REPO, run_stage

JOB_METRIC = {"cls_chexpert": "auc", "cls_rsna": "auc", "cls_covidx": "acc", "seg_siim": "dice", "seg_rsna": "dice",
              "det_rsna": "map", "det_objcxr": "map"}  # fmt: skip
PCTS = (1, 10, 100)
COLUMNS = {  # table -> (job, header prefix)
    "classification": [("cls_chexpert", "CheXpert AUC"), ("cls_rsna", "RSNA AUC"), ("cls_covidx", "COVIDx ACC")],
    "segmentation": [("seg_siim", "SIIM Dice"), ("seg_rsna", "RSNA Dice")],
    "detection": [("det_rsna", "RSNA mAP"), ("det_objcxr", "Object-CXR mAP")],
}
LABELS = {"mflag": "M-FLAG", "random": "Random", "imagenet": "ImageNet"}
PRETRAIN = {"loss_total": 857.6, "loss_align": 1.8, "loss_ortho": 855.8, "i2t_r1": 0.0093, "i2t_r5": 0.046,
            "i2t_r10": 0.10, "t2i_r1": 0.0093, "t2i_r5": 0.056, "t2i_r10": 0.093, "effective_rank": 89.2,
            "mean_abs_offdiag_corr": 0.111, "valid_images": 108, "params_total": 55410624,
            "params_trainable": 32697408, "params_frozen": 22713216, "trainable_share": 0.59,
            "parameter_reduction": 0.41}  # fmt: skip
REFERENCE = yaml.safe_load((REPO / "references/paper_reference.yaml").read_text())
OUTPUTS = [
    "metrics.json",
    "claims.md",
    *[f"tables/{t}.{ext}" for t in (*COLUMNS, "pretraining") for ext in ("md", "tex", "csv")],
    *[f"plots/fraction/{j}.csv" for j in JOB_METRIC],
    *[f"plots/{name}.png" for name in ("fraction", "losses", "spectrum")],
]


def all_cells(inits=("mflag", "random"), seed=0) -> dict:
    rng = random.Random(seed)
    return {(j, p, i): rng.uniform(0.3, 0.95) for j in JOB_METRIC for p in PCTS for i in inits}


def make_project(root: Path, cells: dict, pretrain: dict = PRETRAIN) -> Path:
    """A project folder with the collate stage's inputs, as the other stages write them."""
    for (job, pct, init), value in cells.items():
        rec = {"job": job, "pct": pct, "init": init, JOB_METRIC[job]: value, "best_epoch": 3, "n_train": 16 * pct,
               "map_per_iou": [0.1, 0.2], "params": {"seed": 42}}  # fmt: skip
        path = root / f"reports/finetune/{job}-{pct}-{init}/metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=2))
    pre = root / "reports/pretrain"
    pre.mkdir(parents=True, exist_ok=True)
    (pre / "metrics.json").write_text(json.dumps({**pretrain, "history": [1, 2]}))
    losses = ["step,epoch,align,ortho,total,lr", "5,1,4.0,1497.0,1501.0,1e-3", "10,1,3.9,892.3,896.2,8e-4"]
    (pre / "losses.csv").write_text("\n".join(losses) + "\n")
    (pre / "spectrum.csv").write_text("index,singular_value\n0,2.4\n1,2.1\n2,1.6\n")
    (root / "references").mkdir(exist_ok=True)
    shutil.copy(REPO / "references/paper_reference.yaml", root / "references/paper_reference.yaml")
    return root


def collated(root: Path) -> Path:
    """Run the library on `root`'s inputs the way the stage does; returns the output folder."""
    out = root / "reports"
    collate.write_reports(
        collate.read_cells(out / "finetune"),
        collate.read_pretrain(out / "pretrain/metrics.json"),
        collate.read_columns(out / "pretrain/losses.csv"),
        collate.read_columns(out / "pretrain/spectrum.csv"),
        collate.read_reference(root / "references/paper_reference.yaml"),
        out,
    )
    return out


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


def headers(table: str) -> list[tuple[str, str, int]]:
    return [(f"{prefix} {p}%", job, p) for job, prefix in COLUMNS[table] for p in PCTS]


# ------------------------------------------------------------------------------------------ tests
def test_job_table_metrics_are_the_contract():
    """The job table (mflag/jobs.py) against the metric keys docs/contracts.md fixes."""
    from mflag.jobs import JOBS

    assert collate.JOBS is JOBS
    assert {j: s.metric for j, s in JOBS.items()} == JOB_METRIC


def test_metrics_keys_and_values(tmp_path):
    cells = all_cells()
    flat = flatten(json.loads((collated(make_project(tmp_path, cells)) / "metrics.json").read_text()))
    expected = {f"{j}.{i}.pct{p}.{JOB_METRIC[j]}" for j in JOB_METRIC for p in PCTS for i in ("mflag", "random")}
    expected |= {f"pretrain.{k}" for k in PRETRAIN}
    assert set(flat) == expected  # no n_train, best_epoch, map_per_iou, history
    for (j, p, i), v in cells.items():
        assert flat[f"{j}.{i}.pct{p}.{JOB_METRIC[j]}"] == float(f"{v:.10g}")  # fractions, 10 significant digits
    assert flat["pretrain.params_total"] == 55410624 and flat["pretrain.parameter_reduction"] == 0.41


def test_best_marker_lands_on_the_column_maximum(tmp_path):
    cells = all_cells(("mflag", "random", "imagenet"))
    cells[("cls_rsna", 10, "random")] = 0.99  # random wins this column
    cells[("cls_rsna", 10, "mflag")] = 0.50
    out = collated(make_project(tmp_path, cells))
    for table in COLUMNS:
        md_head, md = md_rows((out / f"tables/{table}.md").read_text())
        csv = pd.read_csv(out / f"tables/{table}.csv").set_index("init")
        for col, (header, job, pct) in enumerate(headers(table)):
            assert md_head[col] == header
            winner = max(LABELS, key=lambda i: cells[(job, pct, i)])
            for init, label in LABELS.items():
                bold = md[label][col].startswith("**")
                assert bold == (init == winner), (table, header, init)
                assert (header in str(csv.loc[init, "best"]).split(";")) == (init == winner)
    _, md = md_rows((out / "tables/classification.md").read_text())
    assert md["Random"][4] == "**99.0**" and md["M-FLAG"][4] == "50.0"
    tex = (out / "tables/classification.tex").read_text()
    assert next(line for line in tex.splitlines() if line.startswith("Random &")).split(" & ")[5] == r"\textbf{99.0}"


def test_csv_values_are_percent_with_one_decimal(tmp_path):
    cells = all_cells(("mflag", "random", "imagenet"), seed=3)
    out = collated(make_project(tmp_path, cells))
    for table in COLUMNS:
        df = pd.read_csv(out / f"tables/{table}.csv").set_index("init")
        assert list(df.index) == ["mflag", "random", "imagenet", "published"]
        for header, job, pct in headers(table):
            assert df[header].dtype == float
            for init in LABELS:
                assert df.loc[init, header] == pytest.approx(round(100 * cells[(job, pct, init)], 1), abs=1e-9)


def test_published_row_holds_the_reference_in_the_100_columns(tmp_path):
    out = collated(make_project(tmp_path, all_cells()))
    published = REFERENCE["mflag_published"]
    for table in COLUMNS:
        row = pd.read_csv(out / f"tables/{table}.csv").set_index("init").loc["published"]
        assert "fraction not stated" in row["label"] and "100%" in row["label"]
        md_head, md = md_rows((out / f"tables/{table}.md").read_text())
        md_pub = next(cells for label, cells in md.items() if label.startswith("published (M-FLAG paper"))
        for col, (header, job, pct) in enumerate(headers(table)):
            if pct == 100:
                assert row[header] == published[job][JOB_METRIC[job]]
                assert float(md_pub[col]) == published[job][JOB_METRIC[job]]
            else:
                assert pd.isna(row[header]) and md_pub[col] == ""
        text = (out / f"tables/{table}.md").read_text() + (out / f"tables/{table}.tex").read_text()
        assert REFERENCE["source"].split(" (")[0] in text and "arXiv 2307.08347" in text


def test_missing_cells_render_as_dashes(tmp_path):
    cells = all_cells()
    gone = [("seg_siim", 1, "mflag"), ("seg_rsna", 100, "random"), ("det_objcxr", 10, "mflag")]
    for key in gone:
        del cells[key]
    root = make_project(tmp_path, cells)
    proc = run_stage(root, sys.executable, str(REPO / "stages/collate.py"))
    assert "3 fine-tuning cells not found" in proc.stderr and "seg_siim-1-mflag" in proc.stderr
    out = root / "reports"
    for table in ("segmentation", "detection"):
        _, md = md_rows((out / f"tables/{table}.md").read_text())
        tex = (out / f"tables/{table}.tex").read_text().splitlines()
        df = pd.read_csv(out / f"tables/{table}.csv").set_index("init")
        for col, (header, job, pct) in enumerate(headers(table)):
            for init in ("mflag", "random"):
                tex_row = next(line for line in tex if line.startswith(f"{LABELS[init]} &")).rstrip(" \\").split(" & ")
                if (job, pct, init) in gone:
                    assert md[LABELS[init]][col] == "-" and tex_row[col + 1] == "--" and pd.isna(df.loc[init, header])
                else:
                    assert md[LABELS[init]][col] not in ("-", "")
    assert "seg_rsna-100-random" in (out / "tables/segmentation.md").read_text()
    metrics = flatten(json.loads((out / "metrics.json").read_text()))
    assert "seg_siim.mflag.pct1.dice" not in metrics and "seg_siim.mflag.pct10.dice" in metrics
    frac = pd.read_csv(out / "plots/fraction/seg_siim.csv").set_index("pct")
    assert list(frac.columns) == ["mflag", "random"] and pd.isna(frac.loc[1, "mflag"])
    assert frac.loc[10, "mflag"] == float(f"{cells[('seg_siim', 10, 'mflag')]:.10g}")


def _claim(text: str, letter: str) -> str:
    section = text.split(f"## ({letter})")[1].split("\n## ")[0]
    return section.splitlines()[0]


def test_claims(tmp_path):
    cells = all_cells()
    text = (collated(make_project(tmp_path, cells)) / "claims.md").read_text()
    assert "not evaluable" in _claim(text, "c") and "not shipped" in text
    assert "not supported" in _claim(text, "a") and "41.0%" in text  # the demo LM: 41%, not 78%

    # M-FLAG ahead everywhere but one cell; ImageNet at 100% below M-FLAG at 1% on RSNA segmentation
    cells = {k: (0.8 if k[2] == "mflag" else 0.6) for k in all_cells(("mflag", "random", "imagenet"))}
    cells[("det_rsna", 10, "random")] = 0.85
    text = collate.render_claims(cells, {**PRETRAIN, "parameter_reduction": 0.775})
    assert "**supported**" in _claim(text, "a")
    assert "not supported" in _claim(text, "b") and "20 of 21" in text and "det_rsna at 10%" in text
    assert "**supported**" in _claim(text, "c") and "80.0" in text and "60.0" in text

    cells[("det_rsna", 10, "random")] = 0.6
    cells[("seg_rsna", 1, "mflag")], cells[("seg_rsna", 100, "imagenet")] = 0.7, 0.75  # still ahead per cell
    text = collate.render_claims(cells, PRETRAIN)
    assert "**supported**" in _claim(text, "b") and "21 of 21" in text
    assert "not supported" in _claim(text, "c")


def test_imagenet_row_and_column_appear_when_present(tmp_path):
    cells = all_cells()
    cells[("cls_rsna", 100, "imagenet")] = 0.7
    out = collated(make_project(tmp_path, cells))
    _, md = md_rows((out / "tables/detection.md").read_text())
    assert md["ImageNet"] == ["-"] * 6
    assert pd.read_csv(out / "plots/fraction/cls_rsna.csv").set_index("pct").loc[100, "imagenet"] == 0.7


def test_outputs_are_byte_identical_across_runs(tmp_path):
    cells = all_cells(("mflag", "random", "imagenet"))
    runs = []
    for name in ("one", "two"):
        root = make_project(tmp_path / name, cells)
        run_stage(root, sys.executable, str(REPO / "stages/collate.py"))
        runs.append({p: (root / "reports" / p).read_bytes() for p in OUTPUTS})
    assert runs[0] == runs[1]
    assert runs[0]["plots/fraction.png"].startswith(b"\x89PNG") and b"matplotlib" not in runs[0]["plots/fraction.png"]


def test_values_that_differ_in_the_15th_digit_write_the_same_bytes(tmp_path):
    """Cells and pretraining metrics as another BLAS would write them (last bits moved): every output, tables
    in percent with one decimal included, is byte-identical, and the fractions carry 10 significant digits."""
    cells = all_cells(("mflag", "random", "imagenet"), seed=5)
    moved = {k: v * (1 + 4e-15) for k, v in cells.items()}
    assert all(moved[k] != v for k, v in cells.items())
    pretrain_moved = {k: v * (1 + 4e-15) if isinstance(v, float) else v for k, v in PRETRAIN.items()}
    runs = []
    for name, values, pre in (("one", cells, PRETRAIN), ("two", moved, pretrain_moved)):
        out = collated(make_project(tmp_path / name, values, pre))
        runs.append({p: (out / p).read_bytes() for p in OUTPUTS})
    assert runs[0] == runs[1]
    frac = runs[0]["plots/fraction/cls_rsna.csv"].decode().splitlines()[1].split(",")
    assert frac[1] == repr(float(f"{cells[('cls_rsna', 1, 'mflag')]:.10g}"))
    _, md = md_rows(runs[0]["tables/detection.md"].decode())
    assert md["M-FLAG"][0].strip("*") == f"{100 * cells[('det_rsna', 1, 'mflag')]:.1f}"  # unrounded value, 1 decimal


def test_missing_pretrain_metrics_exits_with_the_file_name(tmp_path):
    root = make_project(tmp_path, all_cells())
    (root / "reports/pretrain/metrics.json").unlink()
    proc = subprocess.run([sys.executable, str(REPO / "stages/collate.py")], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode != 0
    assert "reports/pretrain/metrics.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "reports/metrics.json").exists()


def test_a_cell_whose_name_disagrees_with_its_content_is_an_error(tmp_path):
    root = make_project(tmp_path, all_cells())
    path = root / "reports/finetune/cls_rsna-10-mflag/metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pct": 100}))
    with pytest.raises(collate.CollateError, match="cls_rsna-10-mflag"):
        collate.read_cells(root / "reports/finetune")


def test_pretraining_table():
    pretrain = {k: v for k, v in PRETRAIN.items() if k != "t2i_r10"}
    tables = collate.render_pretraining(pretrain)
    df = pd.read_csv(io.StringIO(tables["csv"])).set_index("key")
    assert df.loc["parameter_reduction", "value"] == 41.0 and df.loc["params_total", "value"] == 55410624
    assert df.loc["i2t_r5", "value"] == pytest.approx(100 * PRETRAIN["i2t_r5"], abs=0.05)
    assert pd.isna(df.loc["t2i_r10", "value"])  # missing: blank in csv, a dash in md
    assert "| retrieval | text-to-image R@10 | - |" in tables["md"]
    assert "| parameters | total | 55,410,624 |" in tables["md"]


def _stage(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages/collate.py")], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_a_nan_token_in_a_cell_is_rejected_with_the_file_named(tmp_path, token):
    """Python's json reads NaN and Infinity by default; a cell file is strict JSON, so collate refuses them."""
    root = make_project(tmp_path, all_cells())
    path = root / "reports/finetune/cls_rsna-1-mflag/metrics.json"
    path.write_text('{"job": "cls_rsna", "pct": 1, "init": "mflag", "auc": %s}' % token)
    with pytest.raises(collate.CollateError, match=f"cls_rsna-1-mflag/metrics.json: `{token}` is not valid JSON"):
        collate.read_cells(root / "reports/finetune")
    if token == "NaN":
        proc = _stage(root)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "reports/finetune/cls_rsna-1-mflag/metrics.json" in proc.stderr and "NaN" in proc.stderr
        assert not (root / "reports/metrics.json").exists()


def test_a_null_metric_needs_its_reason(tmp_path):
    root = make_project(tmp_path, all_cells())
    path = root / "reports/finetune/det_rsna-10-random/metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "map": None}))
    with pytest.raises(collate.CollateError, match="det_rsna-10-random.*`map` is null without a `not_evaluable`"):
        collate.read_cells(root / "reports/finetune")


NO_POSITIVE = "the test subset (6 rows) has a single class (every target is 0): AUC needs both classes"
NO_BOX = "the test subset (6 rows) has no box: mAP needs a truth box"


def test_a_metric_not_evaluable_is_na_in_the_tables_null_in_metrics_and_not_evaluable_in_claims(tmp_path):
    cells = all_cells()
    root = make_project(tmp_path, cells)
    na = {("cls_rsna", 1, "mflag"): NO_POSITIVE, ("det_rsna", 100, "random"): NO_BOX,
          ("seg_rsna", 1, "mflag"): "the evaluator returned nan for dice on the test subset"}  # fmt: skip
    for (job, pct, init), reason in na.items():
        path = root / f"reports/finetune/{job}-{pct}-{init}/metrics.json"
        metric = JOB_METRIC[job]
        path.write_text(json.dumps({**json.loads(path.read_text()), metric: None, f"{metric}_sd": None,
                                    "seeds": [42, 43], "not_evaluable": reason}))  # fmt: skip
    proc = run_stage(root, sys.executable, str(REPO / "stages/collate.py"))
    assert "3 fine-tuning cells not evaluable" in proc.stderr and NO_BOX in proc.stderr
    assert "not found" not in proc.stderr  # a cell that ran is not missing
    out = root / "reports"

    flat = flatten(json.loads((out / "metrics.json").read_text()))
    for job, pct, init in na:
        assert flat[f"{job}.{init}.pct{pct}.{JOB_METRIC[job]}"] is None  # null kept, no SD
        assert f"{job}.{init}.pct{pct}.{JOB_METRIC[job]}_sd" not in flat
    assert flat["cls_rsna.mflag.pct10.auc"] == float(f"{cells[('cls_rsna', 10, 'mflag')]:.10g}")

    for table in COLUMNS:
        text = {ext: (out / f"tables/{table}.{ext}").read_text() for ext in ("md", "tex")}
        _, md = md_rows(text["md"])
        tex = text["tex"].splitlines()
        df = pd.read_csv(out / f"tables/{table}.csv", keep_default_na=False).set_index("init")
        assert list(df.columns)[-2:] == ["best", "not_evaluable"]
        for col, (header, job, pct) in enumerate(headers(table)):
            for init in ("mflag", "random"):
                tex_row = next(line for line in tex if line.startswith(f"{LABELS[init]} &")).rstrip(" \\").split(" & ")
                listed = df.loc[init, "not_evaluable"].split(";") if df.loc[init, "not_evaluable"] else []
                if (job, pct, init) in na:
                    assert md[LABELS[init]][col] == "n/a" and tex_row[col + 1] == "n/a"
                    assert df.loc[init, header] == ""  # csv: an empty field, the reason in the last column
                    assert f"{header}: {na[(job, pct, init)]}" in listed
                    assert f"{job}-{pct}-{init} ({na[(job, pct, init)]})" in text["md"]  # the table note
                    assert "Not evaluable (1, shown as n/a" in text["md"] and "n/a" in text["tex"].split("smallskip")[1]
                else:
                    assert md[LABELS[init]][col] not in ("n/a", "-", "") and float(df.loc[init, header]) >= 0
                    assert not any(item.startswith(f"{header}:") for item in listed)
        assert "**n/a**" not in text["md"]  # never the best of its column

    frac = pd.read_csv(out / "plots/fraction/cls_rsna.csv").set_index("pct")
    assert pd.isna(frac.loc[1, "mflag"]) and frac.loc[10, "mflag"] == float(f"{cells[('cls_rsna', 10, 'mflag')]:.10g}")

    claims = (out / "claims.md").read_text()
    b = claims.split("## (b)")[1].split("\n## ")[0]
    assert "Not evaluable" in b and f"cls_rsna-1-mflag: {NO_POSITIVE}" in b and f"det_rsna-100-random: {NO_BOX}" in b
    assert "of 18 (job, fraction) cells" in b  # 3 of the 21 pairs have a null
    assert "3 of 21 cannot be compared (a cell not run yet, or not evaluable)" in b
    c = claims.split("## (c)")[1]
    assert "**not evaluable**" in c.splitlines()[0] and "seg_rsna-1-mflag: the evaluator returned nan" in c


def test_cells_with_several_seeds_add_their_sd_and_a_table_note(tmp_path):
    cells = all_cells()
    root = make_project(tmp_path, cells)
    sds = {}
    for k, (job, pct, init) in enumerate(c for c in cells if c[0].startswith("cls_")):
        path = root / f"reports/finetune/{job}-{pct}-{init}/metrics.json"
        rec = json.loads(path.read_text())
        sds[(job, pct, init)] = 0.01 * (k + 1)
        rec.update({f"{JOB_METRIC[job]}_sd": sds[(job, pct, init)], "seeds": list(range(42, 50))})
        path.write_text(json.dumps(rec))
    run_stage(root, sys.executable, str(REPO / "stages/collate.py"))
    out = root / "reports"
    flat = flatten(json.loads((out / "metrics.json").read_text()))
    sd_keys = {k for k in flat if k.endswith("_sd")}
    assert sd_keys == {f"{j}.{i}.pct{p}.{JOB_METRIC[j]}_sd" for j, p, i in sds}
    for (j, p, i), sd in sds.items():
        assert flat[f"{j}.{i}.pct{p}.{JOB_METRIC[j]}_sd"] == sd
        assert flat[f"{j}.{i}.pct{p}.{JOB_METRIC[j]}"] == float(f"{cells[(j, p, i)]:.10g}")  # the mean, 10 digits
    assert "mean over 8 seeds" in (out / "tables/classification.md").read_text()
    assert "mean over 8 seeds" in (out / "tables/classification.tex").read_text()
    assert "seeds" not in (out / "tables/segmentation.md").read_text()


def test_a_spread_without_its_seeds_is_an_error(tmp_path):
    root = make_project(tmp_path, all_cells())
    path = root / "reports/finetune/cls_rsna-10-mflag/metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "auc_sd": 0.02, "seeds": [42]}))
    proc = subprocess.run([sys.executable, str(REPO / "stages/collate.py")], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cls_rsna-10-mflag/metrics.json" in proc.stderr and "auc_sd" in proc.stderr

"""The review workflow end to end, in a temporary Git repository holding this project's files.

`dvc repro` on a tiny params profile; then `dvc exp run -S loss.ortho_weight=0.5` must re-run exactly
pretrain, the -mflag cells and collate, and `dvc exp run -S convirt.temperature=0.2` (a baseline-only param)
exactly pretrain_convirt, the -convirt cells and collate; `dvc metrics diff` must show the moved run's keys and
no random key; `dvc exp show`, `dvc params diff` and `dvc plots diff` must succeed. This runs the real dvc.yaml
(24 fine-tune entries, 72 cells) at toy sizes, so it takes several minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mflag.jobs import JOBS
from tests.conftest import REPO, TINY_PRETRAIN, TINY_SYNTHETIC, deep_merge, repo_params_dict
from tests.test_finetune_stage import TINY_FINETUNE

ENCODERS = ("mflag", "convirt", "random")  # params.yaml's
FINETUNE = [f"finetune_{j.task}@{j.dataset}-{e}" for j in JOBS.values() for e in ENCODERS]

pytestmark = pytest.mark.slow


def _env() -> dict:
    # one thread count for every run a test compares: CPU float reductions, and so the cells' bytes, depend on it
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}  # fmt: skip


def _run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=_env(), timeout=1800)
    if check:
        assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """This project's tracked and untracked-but-not-ignored files in a fresh Git repository, tiny params."""
    wd = tmp_path_factory.mktemp("workflow")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    skip = ("reports/", "data/", "models/", "dvc.lock")  # the outputs of the real run are rebuilt here
    keep = ("data/mgca_splits/",)  # inputs, not outputs: split@<dataset> depends on data/mgca_splits/<dataset>/
    for rel in filter(None, files):
        if (rel.startswith(skip) and not rel.startswith(keep)) or not (REPO / rel).is_file():
            continue
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, wd / rel)
    data = {"image_size": 40}  # toy corpus: large valid / test shares so that no split is empty
    for ds in ("chexpert", "covidx", "objcxr", "nih"):
        data[ds] = {"valid_fraction": 0.3}
    for ds in ("rsna", "siim"):
        data[ds] = {"valid_fraction": 0.25, "test_fraction": 0.25}
    params = deep_merge(repo_params_dict(), {"data": data, "synthetic": TINY_SYNTHETIC, "pretrain": TINY_PRETRAIN,
                                             "finetune": TINY_FINETUNE})  # fmt: skip
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(wd, "git", "init", "-q", "-b", "main")
    _run(wd, "git", "add", "-A")
    _run(wd, "git", "commit", "-qm", "tiny profile")
    return wd


def _experiment(repo: Path, setting: str, encoder: str, stage: str) -> set[str]:
    """`dvc exp run -S <setting>`: it must re-run exactly `stage`, the `-<encoder>` fine-tune entries and
    collate; returns the reports/metrics.json keys that `dvc metrics diff` shows moving."""
    dvc = (sys.executable, "-m", "dvc")
    ran = _ran(_run(repo, *dvc, "exp", "run", "-S", setting).stdout)
    want = {stage, "collate"} | {s for s in FINETUNE if s.endswith(f"-{encoder}")}
    assert ran == want, (sorted(ran - want), sorted(want - ran))
    diff = json.loads(_run(repo, *dvc, "metrics", "diff", "--json").stdout or "{}")
    return set(diff.get("reports/metrics.json", {}))


def test_review_workflow(repo):
    dvc = (sys.executable, "-m", "dvc")
    first = _run(repo, *dvc, "repro")
    assert {"synthesize", "embed_text", "pretrain", "pretrain_convirt", "init_random", "collate"} <= _ran(first.stdout)
    assert set(FINETUNE) <= _ran(first.stdout)
    assert "Data and pipelines are up to date" in _run(repo, *dvc, "status").stdout
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) == set(JOBS) | {"pretrain", "pretrain_convirt"}
    assert all(set(metrics[j]) == set(ENCODERS) for j in JOBS)
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline results")

    moved = _experiment(repo, "loss.ortho_weight=0.5", "mflag", "pretrain")
    assert any(k.startswith("pretrain.") for k in moved), moved
    assert any(".mflag." in k for k in moved), moved
    # a random cell's own figures stay; its differences against M-FLAG move with M-FLAG
    assert not any(re.fullmatch(r"[a-z_]+\.random\.pct\d+\.[a-z]+(_lo|_hi|_sd)?", k) for k in moved), moved
    params = json.loads(_run(repo, *dvc, "params", "diff", "--json").stdout)
    change = params["params.yaml"]["loss.ortho_weight"]
    assert (change["old"], change["new"]) == (1.0, 0.5)
    show = _run(repo, *dvc, "exp", "show", "--json")
    assert "ortho_weight" in show.stdout
    _run(repo, *dvc, "plots", "diff", "-o", str(repo / ".plots-diff"))
    assert (repo / ".plots-diff" / "index.html").is_file()

    # a baseline-only param: only the baseline's branch and collation (from the committed baseline results)
    _run(repo, "git", "checkout", "-q", "--", ".")
    _run(repo, *dvc, "checkout", "-q")
    moved = _experiment(repo, "convirt.temperature=0.2", "convirt", "pretrain_convirt")
    assert any(k.startswith("pretrain_convirt.") for k in moved), moved
    assert not any(k.startswith("pretrain.") for k in moved), moved
    own = re.compile(r"[a-z_]+\.(mflag|random)\.pct\d+\.[a-z]+(_lo|_hi|_sd)?")
    assert not any(own.fullmatch(k) for k in moved), moved


def _lock_entries(repo: Path, stages: list[str]) -> dict:
    """dvc.lock's entries for `stages` (the matrix entries' names as DVC records them)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {s: lock[s] for s in stages}


def test_two_cells_run_side_by_side_record_what_a_sequential_run_records(repo, tmp_path):
    """docs/scale-out.md's parallel-cell procedure on CPU: two `dvc --wait-for-lock repro --single-item` workers
    at once in one workspace (as two GPUs or two tasks of slurm/cells.sbatch's array run them). Afterwards both
    entries are up to date and dvc.lock equals, entry for entry, the one a sequential run in a copy of the same
    workspace writes; every other entry is left as it was."""
    dvc = (sys.executable, "-m", "dvc")
    _run(repo, "git", "checkout", "-q", "--", ".")  # the committed baseline results (test_review_workflow's)
    _run(repo, *dvc, "checkout", "-q")
    if not (repo / "dvc.lock").is_file():  # run on its own: the pipeline first
        _run(repo, *dvc, "repro")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["cls"]["lr"] *= 2  # makes the finetune_cls entries (and collate) pending
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cells = ["finetune_cls@rsna-random", "finetune_cls@covidx-random"]
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    sequential = tmp_path / "sequential"
    shutil.copytree(repo, sequential, symlinks=True)
    for cell in cells:
        _run(sequential, *dvc, "repro", "--single-item", cell)

    workers = [subprocess.Popen([*dvc, "--wait-for-lock", "repro", "--single-item", cell], cwd=repo, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cell in cells]  # fmt: skip
    outputs = [w.communicate(timeout=1800)[0] for w in workers]
    for cell, worker, out in zip(cells, workers, outputs):
        assert worker.returncode == 0, f"{cell}: {out[-3000:]}"
        assert f"Running stage '{cell}'" in out, out[-3000:]
    status = _run(repo, *dvc, "status", *cells).stdout
    assert "up to date" in status, status
    assert _lock_entries(repo, cells) == _lock_entries(sequential, cells)
    after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {k: v for k, v in after.items() if k not in cells} == {k: v for k, v in before.items() if k not in cells}
    assert yaml.safe_load((repo / "dvc.lock").read_text()) == yaml.safe_load((sequential / "dvc.lock").read_text())
    for cell in cells:  # the outputs themselves, not only their recorded hashes
        job = f"cls_{cell.split('@')[1].split('-')[0]}"
        for pct in (1, 10, 100):
            rel = f"reports/finetune/{job}-{pct}-random/metrics.json"
            assert (repo / rel).read_bytes() == (sequential / rel).read_bytes(), rel

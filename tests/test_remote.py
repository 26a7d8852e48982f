"""Results travel between machines: a pipeline run and an experiment pushed to a DVC remote and a Git origin,
then pulled into a fresh clone, arrive byte for byte and up to date (docs/sharing.md).

Everything is local and real: `git` and `dvc` through their command lines, a bare Git repository as the origin
and a folder as the DVC remote. The pipeline is the head of this project's dvc.yaml (its synthesize, split and
preprocess stages, for one dataset) at the workflow test's toy size, so that the commands run as docs/sharing.md
gives them, on a fully run pipeline, in about a minute.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_workflow import _ran, _run, repo  # noqa: F401  (repo: the workflow test's fixture)

pytestmark = pytest.mark.slow

DVC = (sys.executable, "-m", "dvc")
STAGES = {"synthesize", "split@chexpert", "preprocess@chexpert"}
EXPERIMENT, SETTING = "valid40", "data.chexpert.valid_fraction=0.4"  # re-runs split and preprocess of chexpert


def _outputs(root: Path) -> dict[str, str]:
    """SHA-256 of every file under every output that dvc.lock records for STAGES (DVC-cached or Git-tracked)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert STAGES <= set(lock), sorted(lock)
    digests = {}
    for stage in STAGES:
        for out in lock[stage]["outs"]:
            top = root / out["path"]
            for path in sorted([top] if top.is_file() else (p for p in top.rglob("*") if p.is_file())):
                digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _up_to_date(root: Path) -> None:
    status = _run(root, *DVC, "status").stdout
    assert "Data and pipelines are up to date" in status, status


def _head_of_the_pipeline(repo: Path) -> None:
    """dvc.yaml cut to STAGES: the first three stages, their foreach over chexpert alone."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    stages = {name: pipeline["stages"][name] for name in ("synthesize", "split", "preprocess")}
    for name in ("split", "preprocess"):
        stages[name]["foreach"] = {"chexpert": stages[name]["foreach"]["chexpert"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    _run(repo, "git", "commit", "-qam", "the head of the pipeline")


def test_a_run_and_an_experiment_arrive_in_a_fresh_clone_byte_for_byte(repo, tmp_path):  # noqa: F811
    origin, storage, clone = tmp_path / "origin.git", tmp_path / "storage", tmp_path / "clone"
    _run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    _run(repo, "git", "remote", "add", "origin", str(origin))

    _head_of_the_pipeline(repo)

    # the author: a run, a remote, push the data, commit and push the code and dvc.lock
    assert _ran(_run(repo, *DVC, "repro").stdout) == STAGES
    _run(repo, *DVC, "remote", "add", "-d", "shared", str(storage))
    _run(repo, *DVC, "push")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "results")
    _run(repo, "git", "push", "-q", "origin", "main")
    ours = _outputs(repo)
    assert len(ours) > 50 and any(k.startswith("data/cache/chexpert/") for k in ours)

    # the reviewer: clone, pull, nothing to re-run, the very bytes
    _run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    # through Git only the Git-tracked output (cache: false); the rest comes from the DVC remote
    assert {k for k in ours if (clone / k).exists()} == {"reports/data_quality/chexpert.json"}
    _run(clone, *DVC, "pull")
    _up_to_date(clone)
    assert _outputs(clone) == ours

    # an experiment: run and push it (its Git ref to the origin, its data to the DVC remote) ...
    ran = _ran(_run(repo, *DVC, "exp", "run", "-n", EXPERIMENT, "-S", SETTING).stdout)
    assert ran == {"split@chexpert", "preprocess@chexpert"}, ran
    exp = _outputs(repo)
    assert exp["data/splits/chexpert.csv"] != ours["data/splits/chexpert.csv"]
    _run(repo, *DVC, "exp", "push", "origin", EXPERIMENT)

    # ... and in the clone: pull it, apply it, the experiment's bytes, up to date
    _run(clone, *DVC, "exp", "pull", "origin", EXPERIMENT)
    assert EXPERIMENT in _run(clone, *DVC, "exp", "list", "--name-only").stdout
    _run(clone, *DVC, "exp", "apply", EXPERIMENT)
    _up_to_date(clone)
    assert _outputs(clone) == exp
    assert "data.chexpert.valid_fraction" in _run(clone, *DVC, "params", "diff").stdout

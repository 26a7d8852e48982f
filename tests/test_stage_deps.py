"""Every library file a stage imports is among that stage's DVC deps (docs/style.md: "dvc.yaml declares ...
the library files a stage imports as deps"), checked against what Python actually loads.

For each stage, a fresh interpreter imports every ``mflag`` module the stage script names (also the ones
imported inside functions, such as the three task modules of `finetune`) and, for a per-dataset stage,
that dataset's reader; the files of all ``mflag`` modules it then holds in ``sys.modules`` must each be a
dep, or lie under a directory dep. The one exemption is the params schema (``mflag/params.py``,
``mflag/config.py``) and the package marker ``mflag/__init__.py``: dvc.yaml declares the param values a
stage reads instead, so that a new params section does not re-run the corpus (see dvc.yaml).
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

EXEMPT = {"mflag/__init__.py", "mflag/params.py", "mflag/config.py"}
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _script(cmd: str) -> str:
    (script,) = [tok for tok in cmd.split() if tok.startswith("stages/") and tok.endswith(".py")]
    return script


def _named_modules(script: str) -> list[str]:
    """The mflag modules (and possible submodules) a script imports, anywhere in its body."""
    names = []
    for node in ast.walk(ast.parse((REPO / script).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mflag":
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.split(".")[0] == "mflag"]
    return names


@functools.cache
def _loaded_files(modules: tuple[str, ...]) -> frozenset[str]:
    """The repository-relative files of every mflag module loaded after importing `modules`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as err:\n"
        "        if err.name != name:\n"  # `from mflag.x import function`: not a module, fine
        "            raise\n"
        "files = [m.__file__ for n, m in list(sys.modules.items()) if n.split('.')[0] == 'mflag']\n"
        "print(json.dumps(files))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return frozenset(str(Path(f).resolve().relative_to(REPO)) for f in json.loads(proc.stdout))


def _cases():
    for name, stage in STAGES.items():
        if "foreach" not in stage:
            yield name, stage, None, {}
            continue
        for key, item in stage["foreach"].items():
            yield f"{name}@{key}", stage["do"], key, item if isinstance(item, dict) else {}


def _resolve(dep: str, key: str | None, item: dict) -> str:
    dep = dep.replace("${key}", key or "")
    for k, v in item.items():
        dep = dep.replace("${item.%s}" % k, str(v))
    return dep


@pytest.mark.parametrize("name,stage,key,item", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_cover_the_library_files_it_imports(name, stage, key, item):
    modules = _named_modules(_script(stage["cmd"]))
    if name.split("@")[0] in ("split", "preprocess"):
        modules.append(f"mflag.data.{key}")  # the reader mflag.data.reader(key) imports at run time
    deps = [_resolve(d, key, item).rstrip("/") for d in stage["deps"]]
    loaded = _loaded_files(tuple(modules))  # one interpreter per distinct module list
    assert loaded, f"{name}: imports no mflag module?"
    missing = sorted(f for f in loaded - EXEMPT if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not missing, f"{name} imports {missing} but dvc.yaml does not list them among its deps"


def test_per_dataset_stages_load_only_their_own_reader():
    """split@rsna must not load the CheXpert reader: its deps name mflag/data/rsna.py only."""
    loaded = _loaded_files(tuple(_named_modules("stages/split.py") + ["mflag.data.rsna"]))
    readers = {f"mflag/data/{ds}.py" for ds in ("mimic", "chexpert", "rsna", "siim", "covidx", "objcxr", "nih")}
    assert loaded & readers == {"mflag/data/rsna.py"}


def test_dvc_yaml_follows_the_job_table():
    """dvc.yaml's fine-tune stages are the job table (mflag/jobs.py): one stage per task over its datasets, crossed
    with the params' encoders; their outputs, the fractions and the fraction plots follow it; each entry reads
    only its own dataset's cache, its encoder's folder and entry, and its task's params."""
    from mflag.jobs import JOBS, PCTS

    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    tasks = {}
    for name, job in JOBS.items():
        assert name == f"{job.task}_{job.dataset}", "job names are <task>_<dataset>: the stages rebuild them so"
        tasks.setdefault(job.task, []).append(job.dataset)
    assert {s for s in STAGES if s.startswith("finetune")} == {f"finetune_{t}" for t in tasks}
    for task, datasets in tasks.items():
        stage = STAGES[f"finetune_{task}"]
        assert stage["matrix"] == {"dataset": datasets, "encoder": "${encoders}"}
        assert stage["cmd"] == f"python stages/finetune.py {task}_${{item.dataset}} ${{item.encoder}}"
        cells = [f"reports/finetune/{task}_${{item.dataset}}-{p}-${{item.encoder}}" for p in PCTS]
        heads = [f"models/finetune/{task}_${{item.dataset}}-{p}-${{item.encoder}}/head.safetensors" for p in PCTS]
        assert stage["outs"] == [f"{c}/{f}" for c in cells for f in ("live", "bootstrap.csv")] + heads
        assert stage["metrics"] == [f"{c}/metrics.json" for c in cells]
        assert "data/cache/${item.dataset}" in stage["deps"] and "data/cache" not in stage["deps"]
        assert stage["params"] == ["seed", "finetune.device", "finetune.precision", f"finetune.{task}",
                                   "stats.resamples", "encoders.${item.encoder}"]  # fmt: skip
        # a random-init cell must not depend on pretraining: its encoder folder is templated on the encoder
        assert "models/${item.encoder}" in stage["deps"]
        assert not any(s in str(d) for d in stage["deps"] for s in ("models/mflag", "pretrain", "embeddings"))
    assert "reports/finetune" in STAGES["collate"]["deps"]  # every cell, whatever the table holds
    fraction_plots = {next(iter(p)) for p in dvc_yaml["plots"] if isinstance(p, dict)
                      and next(iter(p)).startswith("reports/plots/fraction/")}  # fmt: skip
    assert fraction_plots == {f"reports/plots/fraction/{j}.csv" for j in JOBS}


def test_every_listed_encoder_gets_its_cells(tmp_path):
    """Adding an encoder is one params entry: `dvc stage list` then has its cells for every job (no dvc.yaml edit)."""
    import shutil
    import subprocess
    import sys

    from mflag.jobs import JOBS

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["encoders"]["mgca"] = {"kind": "checkpoint", "weights": "models/mgca/vit.ckpt", "key_prefix": "x.",
                                  "mean": [0.5] * 3, "std": [0.5] * 3}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    cells = {s for s in out if s.startswith("finetune_")}
    want = {f"finetune_{j.task}@{j.dataset}-{e}" for j in JOBS.values() for e in params["encoders"]}
    assert cells == want

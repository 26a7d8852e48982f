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
    readers = {f"mflag/data/{ds}.py" for ds in ("mimic", "chexpert", "rsna", "siim", "covidx", "objcxr")}
    assert loaded & readers == {"mflag/data/rsna.py"}


def test_dvc_yaml_follows_the_job_table():
    """dvc.yaml's fine-tune stages, their outputs and the fraction plots are the job table (mflag/jobs.py)
    crossed with the inits and fractions; each stage reads only its own dataset's cache and task's params."""
    from mflag.jobs import INITS, JOBS, PCTS

    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stage = STAGES["finetune"]
    assert stage["foreach"] == {f"{j}-{i}": {"job": j, "init": i, "task": job.task, "dataset": job.dataset}
                                for j, job in JOBS.items() for i in INITS}  # fmt: skip
    do = stage["do"]
    assert do["cmd"] == "python stages/finetune.py ${item.job} ${item.init}"
    cells = [f"reports/finetune/${{item.job}}-{p}-${{item.init}}" for p in PCTS]
    assert do["outs"] == [f"{c}/live" for c in cells] and do["metrics"] == [f"{c}/metrics.json" for c in cells]
    assert "data/cache/${item.dataset}" in do["deps"] and "data/cache" not in do["deps"]
    assert do["params"] == ["seed", "finetune.device", "finetune.precision", "finetune.${item.task}"]
    # a random-init stage must not depend on pretraining: its encoder path is templated on the init
    assert "models/${item.init}/vision_encoder.safetensors" in do["deps"]
    assert not any(s in str(d) for d in do["deps"] for s in ("models/mflag", "pretrain", "embeddings"))
    assert "reports/finetune" in STAGES["collate"]["deps"]  # every cell, whatever the table holds
    fraction_plots = {next(iter(p)) for p in dvc_yaml["plots"] if isinstance(p, dict)
                      and next(iter(p)).startswith("reports/plots/fraction/")}  # fmt: skip
    assert fraction_plots == {f"reports/plots/fraction/{j}.csv" for j in JOBS}

"""Pretraining across nodes from the params: dvc.yaml's `pretrain` command, its torchrun options filled from
`pretrain.nnodes`, `nproc`, `rdzv_backend`, `rdzv_endpoint` and `rdzv_id`, started by two launchers at once as
two nodes would run it (gloo on the CPU, c10d rendezvous on 127.0.0.1 at a free port, one process each, one
shared working folder as on a cluster's shared filesystem).

The reference is the same stage as one node with two processes (`nnodes 1`, `nproc 2`): the same world of two
ranks, so the same run. A one-process run with the doubled batch is not one: batch norm, the orthogonality
term and the augmentation's generator are per rank (docs/gpu.md), so it is a different, equally valid, run.
That two ranks on one node equal one process averaging the two ranks' losses is
tests/test_pretrain.py::test_ddp_step_equals_the_average_of_per_rank_losses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mflag.params import LAUNCH_KEYS
from tests.conftest import REPO, repo_params_dict, run_stage
from tests.test_pretrain_stage import _copy_inputs, _files

LAUNCH_OPTIONS = ("--nnodes", "--nproc_per_node", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id")


def _stage_argv(wd: Path, stage: str = "pretrain") -> list[str]:
    """The stage's command as DVC renders it from dvc.yaml and `wd`'s params.yaml, as argv: torchrun as the
    running interpreter's module, the stage script from this repository (the folder holds params and data)."""
    from dvc.repo import Repo

    scratch = wd.parent / f"{wd.name}-dvc"  # a DVC project beside `wd`, only to render the command
    scratch.mkdir()
    (scratch / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (scratch / "params.yaml").write_text((wd / "params.yaml").read_text())
    Repo.init(str(scratch), no_scm=True)
    with Repo(str(scratch)) as repo:
        (found,) = repo.stage.collect(f"{scratch / 'dvc.yaml'}:{stage}")  # the path: not the cwd's dvc.yaml
        argv = found.cmd.split()
    assert argv[0] == "torchrun", argv
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:-1], str(REPO / argv[-1])]


def _set_launch(wd: Path, **launch) -> None:
    params = yaml.safe_load((wd / "params.yaml").read_text())
    params["pretrain"].update(launch)
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # one thread per worker: two workers share this machine's two cores
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_dvc_yaml_maps_every_launch_param_to_its_torchrun_option():
    """Fast: both pretraining commands pass each launch key to torchrun's option of that name, nothing else."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    keys = ("nnodes", "nproc", "rdzv_backend", "rdzv_endpoint", "rdzv_id")
    assert set(keys) - {"nproc"} == set(LAUNCH_KEYS)
    for name, tail in (("pretrain", []), ("pretrain_convirt", ["convirt"])):
        argv = stages[name]["cmd"].split()
        want = [f"{opt}=${{pretrain.{key}}}" for opt, key in zip(LAUNCH_OPTIONS, keys)]
        assert argv == ["torchrun", *want, "stages/pretrain.py", *tail], argv
    defaults = repo_params_dict()["pretrain"]
    assert {k: defaults[k] for k in LAUNCH_KEYS} == {"nnodes": 1, "rdzv_backend": "c10d",
                                                     "rdzv_endpoint": "localhost:0", "rdzv_id": "mflag"}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(stage_workdir, tmp_path_factory) -> Path:
    """The tiny corpus's split and cached data (conftest), and the text embeddings pretraining reads."""
    wd = _copy_inputs(stage_workdir, tmp_path_factory.mktemp("multinode") / "inputs")
    run_stage(wd, sys.executable, str(REPO / "stages/embed_text.py"))
    return wd


@pytest.fixture(scope="module")
def one_node_two_processes(inputs, tmp_path_factory) -> Path:
    wd = _copy_inputs(inputs, tmp_path_factory.mktemp("one-node") / "wd")
    _set_launch(wd, nnodes=1, nproc=2)
    argv = _stage_argv(wd)
    assert "--standalone" not in argv and "--rdzv_endpoint=localhost:0" in argv and "--nproc_per_node=2" in argv
    proc = subprocess.run(argv, cwd=wd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd


@pytest.mark.slow
def test_two_nodes_from_params_train_what_one_node_with_two_processes_trains(one_node_two_processes, inputs,
                                                                             tmp_path):  # fmt: skip
    wd = _copy_inputs(inputs, tmp_path / "wd")  # the folder both "nodes" share
    endpoint = f"127.0.0.1:{_free_port()}"
    _set_launch(wd, nnodes=2, nproc=1, rdzv_endpoint=endpoint, rdzv_id="two-nodes")
    argv = _stage_argv(wd)
    assert {"--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
            "--rdzv_id=two-nodes"} <= set(argv)  # fmt: skip
    start = time.monotonic()
    # the same command on both "nodes", started together; c10d assigns the node ranks
    nodes = [subprocess.Popen(argv, cwd=wd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]  # fmt: skip
    try:
        logs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()  # a PID this test started
                node.wait()
    for node, (_, err) in zip(nodes, logs):
        assert node.returncode == 0, err[-4000:]
    # one world of two ranks, one on each launcher; rank 0 wrote the outputs once
    progress = [line for out, _ in logs for line in out.splitlines() if line.startswith("pretrain epoch")]
    assert len(progress) == yaml.safe_load((wd / "params.yaml").read_text())["pretrain"]["epochs"], progress
    run = json.loads((wd / "models/mflag/run.json").read_text())["params"]
    assert run["world_size"] == 2 and not set(LAUNCH_KEYS) & set(run["pretrain"])
    assert json.loads((wd / "reports/pretrain/timing.json").read_text())["world_size"] == 2

    ref = one_node_two_processes
    ours, theirs = load_file(str(wd / "models/mflag/vision_encoder.safetensors")), load_file(
        str(ref / "models/mflag/vision_encoder.safetensors"))  # fmt: skip
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    # the same world: the same bytes in every output but timing.json, except that run.json and checkpoint.pt
    # record `pretrain.nproc` (1 here, 2 there); no launch key, so the rendezvous left no trace
    mine, other = _files(wd), _files(ref)
    assert sorted(mine) == sorted(other)
    assert [k for k in mine if mine[k] != other[k]] == ["models/mflag/checkpoint.pt", "models/mflag/run.json"]
    a, b = (json.loads((root / "models/mflag/run.json").read_text()) for root in (wd, ref))
    assert (a["params"]["pretrain"].pop("nproc"), b["params"]["pretrain"].pop("nproc")) == (1, 2) and a == b
    a, b = (torch.load(root / "models/mflag/checkpoint.pt", weights_only=True) for root in (wd, ref))
    assert sorted(a["model"]) == sorted(b["model"]) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"] == b["history"]
    print(f"two launchers: {time.monotonic() - start:.1f} s")


@pytest.mark.slow
def test_a_world_other_than_the_params_stops_the_stage(inputs, tmp_path):
    """torchrun started by hand with another shape than the params' nnodes x nproc: one line, no outputs."""
    wd = _copy_inputs(inputs, tmp_path / "wd")
    _set_launch(wd, nnodes=2, nproc=1, rdzv_endpoint="127.0.0.1:29555")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(REPO / "stages/pretrain.py")]  # fmt: skip
    proc = subprocess.run(argv, cwd=wd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("error: pretrain: torchrun started 1 process(es), 1 on this node, but pretrain.nnodes x pretrain.nproc is "
            "2 x 1: launch with --nnodes=2 --nproc_per_node=1") in proc.stderr, proc.stderr[-3000:]  # fmt: skip
    assert not (wd / "models/mflag").exists() and not (wd / "reports/pretrain").exists()

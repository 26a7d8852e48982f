"""Range checks at load: every numeric param is finite and within its interval, per-dataset mappings are
complete, lists have their lengths, and the cross-field rules hold. Each bad value is a ParamsError naming
the dotted key and the allowed range; a stage ends with exit code 2 and that message, without a traceback.

The expected keys and ranges below are written out by hand from the issue and docs/contracts.md, not read
from the schema.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from mflag.params import ParamsError, load
from tests.conftest import REPO, repo_params_dict

NAN, INF = float("nan"), float("inf")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


DELETE = object()  # a setting that removes the key


def _params(settings: dict) -> dict:
    """params.yaml with `settings` applied: dotted key -> new value (replacing it whole), or DELETE."""
    data = repo_params_dict()
    for dotted, value in settings.items():
        *parents, last = dotted.split(".")
        node = data
        for k in parents:
            node = node[k]
        assert last in node, dotted  # the setting changes a key that exists
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return data


def _error(tmp_path, settings: dict) -> str:
    with pytest.raises(ParamsError) as err:
        load(_write(tmp_path, _params(settings)))
    return str(err.value)


# (settings, the key the message must name, what it must say is allowed)
BAD = {
    # NaN and infinity
    "nan ortho_weight": ({"loss.ortho_weight": NAN}, "loss.ortho_weight", "[0, inf)"),
    "inf ortho_weight": ({"loss.ortho_weight": INF}, "loss.ortho_weight", "[0, inf)"),
    "-inf lr": ({"pretrain.lr": -INF}, "pretrain.lr", "(0, inf)"),
    "nan prevalence": ({"synthetic.rsna.prevalence.consolidation": NAN}, "synthetic.rsna.prevalence.consolidation",
                       "[0, 1]"),
    "huge int for a float": ({"loss.ortho_offdiag_weight": 10**400}, "loss.ortho_offdiag_weight", "[0, inf)"),
    # negative
    "negative ortho_weight": ({"loss.ortho_weight": -1.0}, "loss.ortho_weight", "[0, inf)"),
    "negative image_size": ({"data.image_size": -64}, "data.image_size", "[1, inf)"),
    "negative pretrain lr": ({"pretrain.lr": -1e-3}, "pretrain.lr", "(0, inf)"),
    "negative weight_decay": ({"finetune.cls.weight_decay": -1e-6}, "finetune.cls.weight_decay", "[0, inf)"),
    "negative seed": ({"seed": -1}, "seed", "[0, 4294967295]"),
    "negative pretrain seed": ({"pretrain.seed": -5}, "pretrain.seed", "[0, 4294967295]"),
    "negative pretrain workers": ({"pretrain.workers": -1}, "pretrain.workers", "[0, inf)"),
    "negative blur": ({"synthetic.siim.style.blur": -0.5}, "synthetic.siim.style.blur", "[0, inf)"),
    # zero where positive
    "zero image_size": ({"data.image_size": 0}, "data.image_size", "[1, inf)"),
    "zero pretrain lr": ({"pretrain.lr": 0.0}, "pretrain.lr", "(0, inf)"),
    "zero det batch": ({"finetune.det.batch_size.rsna.pct1": 0}, "finetune.det.batch_size.rsna.pct1", "[1, inf)"),
    "zero det lr": ({"finetune.det.lr.objcxr.pct100": 0.0}, "finetune.det.lr.objcxr.pct100", "(0, inf)"),
    "zero seg batch": ({"finetune.seg.batch_size.siim": 0}, "finetune.seg.batch_size.siim", "[1, inf)"),
    "zero data workers": ({"data.workers": 0}, "data.workers", "[1, inf)"),
    "zero patience": ({"finetune.seg.patience": 0}, "finetune.seg.patience", "[1, inf)"),
    "zero epochs": ({"pretrain.epochs": 0}, "pretrain.epochs", "[1, inf)"),
    "zero probe seeds": ({"finetune.cls.seeds": 0}, "finetune.cls.seeds", "[1, inf)"),
    "zero proj_dim": ({"model.proj_dim": 0}, "model.proj_dim", "[1, inf)"),
    "zero gamma": ({"synthetic.mimic.style.gamma": 0.0}, "synthetic.mimic.style.gamma", "(0, inf)"),
    "zero synthetic images": ({"synthetic.siim.images": 0}, "synthetic.siim.images", "[1, inf)"),
    # out of interval
    "max_skip_fraction above 1": ({"data.max_skip_fraction": 1.5}, "data.max_skip_fraction", "[0, 1]"),
    "max_skip_fraction below 0": ({"data.max_skip_fraction": -0.1}, "data.max_skip_fraction", "[0, 1]"),
    "iou threshold 1.5": ({"finetune.det.iou_thresholds": [1.5]}, "finetune.det.iou_thresholds[0]", "(0, 1)"),
    "iou threshold 0": ({"finetune.det.iou_thresholds": [0.0, 0.5]}, "finetune.det.iou_thresholds[0]", "(0, 1)"),
    "iou threshold 1": ({"finetune.det.iou_thresholds": [0.5, 1.0]}, "finetune.det.iou_thresholds[1]", "(0, 1)"),
    "conf_threshold 1": ({"finetune.det.conf_threshold": 1.0}, "finetune.det.conf_threshold", "[0, 1)"),
    "nms_iou above 1": ({"finetune.det.nms_iou": 1.2}, "finetune.det.nms_iou", "[0, 1]"),
    "valid_fraction 1": ({"data.rsna.valid_fraction": 1.0, "data.rsna.test_fraction": 0.0},
                         "data.rsna.valid_fraction", "[0, 1)"),
    "frozen_stages 5": ({"pretrain.frozen_stages": 5}, "pretrain.frozen_stages", "[0, 4]"),
    "restart_fraction 0": ({"pretrain.restart_fraction": 0.0}, "pretrain.restart_fraction", "(0, 1]"),
    "restart_fraction above 1": ({"pretrain.restart_fraction": 1.5}, "pretrain.restart_fraction", "(0, 1]"),
    "beta of 1": ({"pretrain.betas": [0.9, 1.0]}, "pretrain.betas[1]", "[0, 1)"),
    "perspective_p above 1": ({"pretrain.perspective_p": 2.0}, "pretrain.perspective_p", "[0, 1]"),
    "max_length 1": ({"model.text.max_length": 1}, "model.text.max_length", "[2, inf)"),
    "border one half": ({"synthetic.objcxr.style.border": 0.5}, "synthetic.objcxr.style.border", "[0, 0.5)"),
    "hedge_prob above 1": ({"synthetic.covidx.hedge_prob": 1.5}, "synthetic.covidx.hedge_prob", "[0, 1]"),
    "seg input not a multiple of 32": ({"finetune.seg.input_size": 40}, "finetune.seg.input_size", "multiple of 32"),
    "det input below 32": ({"finetune.det.input_size": 16}, "finetune.det.input_size", "[32, inf)"),
    # per-dataset mappings: a missing or an unknown key
    "seg batch without rsna": ({"finetune.seg.batch_size.rsna": DELETE}, "finetune.seg.batch_size.rsna", "rsna"),
    "seg batch with chexpert": ({"finetune.seg.batch_size": {"siim": 8, "rsna": 16, "chexpert": 4}},
                                "finetune.seg.batch_size.chexpert", "siim"),
    "det lr without pct10": ({"finetune.det.lr.rsna.pct10": DELETE}, "finetune.det.lr.rsna.pct10", "pct100"),
    "det lr with pct50": ({"finetune.det.lr.rsna": {"pct1": 2e-4, "pct10": 5e-4, "pct100": 5e-4, "pct50": 5e-4}},
                          "finetune.det.lr.rsna.pct50", "pct10"),
    "det batch without objcxr": ({"finetune.det.batch_size.objcxr": DELETE}, "finetune.det.batch_size.objcxr",
                                 "rsna"),
    "det lr with chexpert": ({"finetune.det.lr": {"rsna": {"pct1": 2e-4, "pct10": 5e-4, "pct100": 5e-4},
                                                  "objcxr": {"pct1": 2e-4, "pct10": 5e-4, "pct100": 5e-4},
                                                  "chexpert": {"pct1": 2e-4, "pct10": 5e-4, "pct100": 5e-4}}},
                             "finetune.det.lr.chexpert", "objcxr"),
    "class_mix without normal": ({"synthetic.covidx.class_mix.normal": DELETE}, "synthetic.covidx.class_mix.normal",
                                 "COVID-19"),
    "unknown finding": ({"synthetic.rsna.prevalence": {"consolidation": 0.3, "pneumonia": 0.2}},
                        "synthetic.rsna.prevalence.pneumonia", "effusion"),
    # lists: empty, wrong length, not increasing
    "empty iou_thresholds": ({"finetune.det.iou_thresholds": []}, "finetune.det.iou_thresholds", "at least 1"),
    "decreasing iou_thresholds": ({"finetune.det.iou_thresholds": [0.5, 0.4]}, "finetune.det.iou_thresholds",
                                  "strictly increasing"),
    "repeated iou_thresholds": ({"finetune.det.iou_thresholds": [0.5, 0.5, 0.6]}, "finetune.det.iou_thresholds",
                                "strictly increasing"),
    "four decoder channels": ({"finetune.seg.decoder_channels": [64, 32, 16, 8]}, "finetune.seg.decoder_channels",
                              "exactly 5"),
    "zero decoder channel": ({"finetune.seg.decoder_channels": [64, 32, 0, 16, 8]},
                             "finetune.seg.decoder_channels[2]", "[1, inf)"),
    "segmentation prior of 0": ({"finetune.seg.prior": 0.0}, "finetune.seg.prior", "(0, 1)"),
    "segmentation prior of 1": ({"finetune.seg.prior": 1.0}, "finetune.seg.prior", "(0, 1)"),
    "negative min_epoch_images": ({"finetune.det.min_epoch_images": -1}, "finetune.det.min_epoch_images", "[0, inf)"),
    "two neck widths": ({"finetune.det.neck_widths": [32, 64]}, "finetune.det.neck_widths", "exactly 3"),
    "three betas": ({"pretrain.betas": [0.9, 0.99, 0.999]}, "pretrain.betas", "exactly 2"),
    # cross-field rules
    "valid + test fractions": ({"data.siim.valid_fraction": 0.5, "data.siim.test_fraction": 0.5},
                               "data.siim.test_fraction", "[0, 1)"),
    "synthetic valid + test patients": ({"synthetic.mimic.valid_patients": 0.6, "synthetic.mimic.test_patients": 0.4},
                                        "synthetic.mimic.test_patients", "[0, 1)"),
    "eta_min above lr": ({"pretrain.lr": 1e-3, "pretrain.eta_min": 1e-2}, "pretrain.eta_min", "[0, 0.001]"),
    "eta_min above the baseline's lr": ({"pretrain.eta_min": 5e-4}, "pretrain.eta_min", "convirt.lr"),
    "rotation high below low": ({"pretrain.rotation": [15, 0]}, "pretrain.rotation", "low <= high"),
    # the launch: torchrun's options, written into the stage's shell command by dvc.yaml
    "zero nnodes": ({"pretrain.nnodes": 0}, "pretrain.nnodes", "[1, inf)"),
    "static rendezvous": ({"pretrain.rdzv_backend": "static"}, "pretrain.rdzv_backend", "'c10d'"),
    "endpoint without a port": ({"pretrain.rdzv_endpoint": "node1"}, "pretrain.rdzv_endpoint", "host:port"),
    "endpoint port above 65535": ({"pretrain.rdzv_endpoint": "node1:70000"}, "pretrain.rdzv_endpoint",
                                  "[0, 65535]"),
    "endpoint with a shell command": ({"pretrain.rdzv_endpoint": "node1:29500; touch x"}, "pretrain.rdzv_endpoint",
                                      "host:port"),
    "endpoint with a space": ({"pretrain.rdzv_endpoint": "node1 :29500"}, "pretrain.rdzv_endpoint", "host:port"),
    "free port on two nodes": ({"pretrain.nnodes": 2, "pretrain.rdzv_endpoint": "node1:0"}, "pretrain.rdzv_endpoint",
                               "[1, 65535]"),
    "the default endpoint on two nodes": ({"pretrain.nnodes": 2}, "pretrain.rdzv_endpoint", "port 0"),
    "empty rdzv_id": ({"pretrain.rdzv_id": ""}, "pretrain.rdzv_id", "letters, digits"),
    "rdzv_id with a space": ({"pretrain.rdzv_id": "my run"}, "pretrain.rdzv_id", "letters, digits"),
    "class_mix all zero": ({"synthetic.covidx.class_mix": {"normal": 0, "pneumonia": 0, "COVID-19": 0}},
                           "synthetic.covidx.class_mix", "> 0"),
    # trust_remote_code needs a pinned revision
    "remote code without revision": ({"model.text.trust_remote_code": True}, "model.text.revision", "40 hex"),
    "remote code on a branch": ({"model.text.trust_remote_code": True, "model.text.revision": "main"},
                                "model.text.revision", "40 hex"),
    "empty revision": ({"model.text.revision": ""}, "model.text.revision", "commit hash or null"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_bad_value_names_the_key_and_the_allowed_range(tmp_path, name):
    settings, key, allowed = BAD[name]
    msg = _error(tmp_path, settings)
    assert f"`{key}`" in msg, msg
    assert allowed in msg, msg


def test_nan_ortho_weight_message_in_full(tmp_path):
    """The issue's first case, end to end through YAML's `.nan`: key, value and range in one line."""
    text = (REPO / "params.yaml").read_text().replace("ortho_weight: 1.0", "ortho_weight: .nan", 1)
    assert "ortho_weight: .nan" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load(path)
    assert str(err.value) == "params: `loss.ortho_weight` must be a finite number in [0, inf), got nan"


def test_issue_cases_are_refused_with_their_messages(tmp_path):
    """The values the issue found accepted at load, each refused with what is allowed."""
    msg = _error(tmp_path, {"finetune.det.iou_thresholds": [1.5]})
    assert msg == "params: `finetune.det.iou_thresholds[0]` must be in (0, 1), got 1.5"
    msg = _error(tmp_path, {"data.image_size": 0})
    assert msg == "params: `data.image_size` must be in [1, inf), got 0"
    msg = _error(tmp_path, {"finetune.seg.batch_size": {"siim": 8}})
    assert msg.startswith("params: missing key `finetune.seg.batch_size.rsna`")
    assert "siim, rsna" in msg and "mflag/jobs.py" in msg


def test_every_numeric_param_refuses_nan(tmp_path):
    """Every number in params.yaml, set to NaN, is refused with its own key named: no numeric param escapes
    the checks (an int field refuses it as a wrong type, a float field as not finite)."""

    def leaves(node, path=()):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from leaves(v, (*path, i))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            yield path

    base = repo_params_dict()
    paths = list(leaves(base))
    assert len(paths) > 150  # every section's numbers, lists and per-dataset mappings included
    for path in paths:
        data = copy.deepcopy(base)
        node = data
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = NAN
        dotted = ".".join(str(k) for k in path if not isinstance(k, int))
        with pytest.raises(ParamsError) as err:
            load(_write(tmp_path, data))
        assert f"`{dotted}" in str(err.value), (path, str(err.value))


@pytest.mark.parametrize(
    "settings",
    [
        {"loss.ortho_weight": 0.0},  # alignment only
        {"data.max_skip_fraction": 0.0},
        {"data.max_skip_fraction": 1.0},
        {"pretrain.workers": 0},  # batches gathered in the training loop
        {"pretrain.seed": None},
        {"pretrain.frozen_stages": 4, "pretrain.restart_fraction": 1.0, "pretrain.eta_min": 1e-3, "pretrain.lr": 1e-3,
         "convirt.lr": 1e-3},
        {"pretrain.rotation": [-10, -10]},
        {"pretrain.nnodes": 2, "pretrain.rdzv_endpoint": "node-001.cluster:29500", "pretrain.rdzv_id": "job_42.a-1"},
        {"pretrain.nnodes": 64, "pretrain.rdzv_endpoint": "10.0.0.1:65535"},
        {"pretrain.rdzv_endpoint": "[::1]:1"},  # an IPv6 address in brackets, as torchrun takes it
        {"finetune.seg.input_size": 32, "finetune.det.input_size": 32},
        {"finetune.det.nms_iou": 1.0, "finetune.det.conf_threshold": 0.0},
        {"finetune.det.iou_thresholds": [0.5]},
        {"finetune.cls.upsample": 0},
        {"data.mimic.valid_fraction": 0.0, "data.mimic.test_fraction": 0.0},
        {"synthetic.covidx.class_mix": {"normal": 1.0, "pneumonia": 0.0, "COVID-19": 0.0}},
        {"synthetic.rsna.prevalence": {"consolidation": 1.0}},  # a subset of the finding kinds
        {"model.text.trust_remote_code": True, "model.text.revision": COMMIT},
        {"model.text.revision": "v1.0"},  # pinned without remote code: any revision name
        {"seed": 0},
    ],
)
def test_values_at_the_edges_of_their_ranges_load(tmp_path, settings):
    load(_write(tmp_path, _params(settings)))


@pytest.mark.parametrize(
    "settings, key, allowed",
    [
        ({"loss.ortho_weight": NAN}, "loss.ortho_weight", ["[0, inf)"]),
        ({"finetune.seg.batch_size.rsna": DELETE}, "finetune.seg.batch_size.rsna", ["siim", "rsna"]),
    ],
)
def test_split_stage_stops_with_the_key_and_range_and_no_traceback(tmp_path, settings, key, allowed):
    _write(tmp_path, _params(settings))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "split.py"), "rsna"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert f"`{key}`" in proc.stderr
    after = proc.stderr.split(f"`{key}`", 1)[1]
    assert all(a in after for a in allowed), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was written

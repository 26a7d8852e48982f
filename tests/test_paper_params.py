"""configs/paper.yaml: the paper-scale params parse with the stages' loader, hold the paper's values,
and have exactly the keys of params.yaml (so the two files never drift apart)."""

from __future__ import annotations

import pytest
import yaml

from mflag.params import ParamsError, load
from tests.conftest import REPO

PAPER = REPO / "configs/paper.yaml"


def key_paths(node, prefix: str = "") -> set[str]:
    """Every dotted key path of a nested mapping (leaves and inner nodes)."""
    if not isinstance(node, dict):
        return set()
    paths = set()
    for k, v in node.items():
        path = f"{prefix}{k}"
        paths |= {path} | key_paths(v, f"{path}.")
    return paths


def test_paper_params_have_the_same_keys_as_params_yaml():
    """The same keys, except under `encoders`, whose entries are the study's choice (the paper's adds imagenet)."""
    demo, paper = (yaml.safe_load(path.read_text()) for path in (REPO / "params.yaml", PAPER))
    assert set(demo["encoders"]) <= set(paper["encoders"])
    demo["encoders"] = paper["encoders"] = {}
    demo, paper = key_paths(demo), key_paths(paper)
    assert sorted(demo - paper) == [] and sorted(paper - demo) == []


def test_paper_params_list_the_papers_encoders():
    p = load(PAPER)
    assert list(p.encoders) == ["mflag", "convirt", "random", "imagenet"]
    assert p.encoders["imagenet"].weights == p.model.vision.imagenet_weights  # one ImageNet file for both uses
    assert p.convirt.text_free_layers == 6 and p.mflag.text_free_layers == 0


def test_paper_params_hold_the_papers_values():
    p = load(PAPER)  # the typed loader every stage uses (load_or_exit wraps it)
    assert p.data.image_size == 256
    assert p.data.mimic.root == "/data/mimic-cxr-jpg/2.0.0"
    assert all(getattr(p.data, ds).root.startswith("/data/") for ds in ("chexpert", "rsna", "siim", "covidx", "objcxr", "nih"))
    assert p.loss.ortho_weight == 1.0 and p.loss.ortho_offdiag_weight == pytest.approx(0.0051)
    assert p.model.text.name_or_path == "microsoft/BiomedVLP-CXR-BERT-general"
    # shipped with remote code off: no commit of CXR-BERT has been reviewed and pinned (see the file's top)
    assert p.model.text.trust_remote_code is False and p.model.text.revision is None
    assert p.model.text.max_length == 512 and p.model.vision.init == "imagenet"
    assert (p.model.proj_hidden, p.model.proj_dim) == (2048, 1024)
    pre = p.pretrain
    assert (pre.epochs, pre.batch_size, pre.crop) == (50, 512, 224)
    assert pre.lr == pytest.approx(2e-5) and pre.weight_decay == pytest.approx(0.05) and pre.precision == "bf16"
    cls = p.finetune.cls
    assert (cls.crop, cls.augment, cls.max_epochs, cls.patience, cls.batch_size) == (224, True, 50, 10, 48)
    assert cls.lr == pytest.approx(5e-4) and cls.weight_decay == pytest.approx(1e-6)
    seg = p.finetune.seg
    assert (seg.input_size, seg.max_epochs, seg.patience, seg.augment, seg.balance) == (224, 50, 10, True, True)
    assert seg.batch_size == {"siim": 8, "rsna": 16} and seg.decoder_channels == [256, 128, 64, 32, 16]
    assert seg.lr == pytest.approx(5e-4) and seg.weight_decay == pytest.approx(0.05)
    det = p.finetune.det
    assert (det.input_size, det.max_epochs) == (224, 50) and det.neck_widths == [128, 256, 512]
    assert det.weight_decay == pytest.approx(1e-6)
    assert det.lr == {"rsna": {"pct1": 2e-4, "pct10": 5e-4, "pct100": 5e-4},
                      "objcxr": {"pct1": 2.5e-4, "pct10": 5e-4, "pct100": 5e-4}}  # fmt: skip
    assert det.batch_size == {"rsna": {"pct1": 8, "pct10": 16, "pct100": 16},
                              "objcxr": {"pct1": 8, "pct10": 16, "pct100": 16}}  # fmt: skip
    assert det.iou_thresholds == pytest.approx([0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75])


def test_paper_params_switch_to_remote_code_with_a_pinned_revision(tmp_path):
    """The switch the top of configs/paper.yaml describes: trust_remote_code true loads with a 40-hex commit,
    and is refused without one."""
    data = yaml.safe_load(PAPER.read_text())
    commit = "0123456789abcdef0123456789abcdef01234567"
    data["model"]["text"].update(trust_remote_code=True, revision=commit)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    text = load(path).model.text
    assert text.trust_remote_code is True and text.revision == commit
    data["model"]["text"]["revision"] = None
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"model\.text\.revision"):
        load(path)

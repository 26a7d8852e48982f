"""Encoders as data (mflag/encoders.py, params `encoders`): each kind's weights file read into exactly the trunk it
holds, and a missing or mismatched file refused with the path and what to do. The references are torchvision's
own ResNet-50 state dicts, written by the tests under the key layouts of the field's checkpoints."""

from __future__ import annotations

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from mflag.encoders import PIPELINE_NORMALISATION, EncoderError, encoder, load_encoder
from mflag.params import EncoderParams, ParamsError, load
from tests.conftest import REPO

IMAGENET_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _source(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet50().state_dict()


def _spec(kind: str, weights: str | None, prefix: str = "", norm: dict | None = None) -> EncoderParams:
    norm = norm or {"mean": None, "std": None}
    return EncoderParams(kind=kind, weights=weights, key_prefix=prefix, **norm)


def _equal_to_source(state: dict, source: dict) -> None:
    assert set(state) == set(source) - {"fc.weight", "fc.bias"}
    for k, v in state.items():
        assert torch.equal(v, source[k]), k


def test_a_lightning_checkpoint_under_a_key_prefix_loads_its_trunk_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = _source()
    ckpt = {f"img_encoder_q.model.{k}": v for k, v in source.items()}
    ckpt["text_encoder_q.model.embeddings.word_embeddings.weight"] = torch.randn(10, 4)  # other modules: ignored
    (tmp_path / "models/mgca").mkdir(parents=True)
    torch.save({"epoch": 3, "global_step": 10, "state_dict": ckpt}, tmp_path / "models/mgca/mgca.ckpt")
    enc = encoder("mgca", _spec("checkpoint", "models/mgca/mgca.ckpt", "img_encoder_q.model.", IMAGENET_NORM))
    _equal_to_source(load_encoder(enc), source)
    assert (enc.mean, enc.std) == (tuple(IMAGENET_NORM["mean"]), tuple(IMAGENET_NORM["std"]))
    assert enc.label == "mgca"


def test_torchvision_imagenet_file_and_safetensors_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = _source(1)
    (tmp_path / "models/imagenet").mkdir(parents=True)
    torch.save(source, tmp_path / "models/imagenet/resnet50.pth")
    _equal_to_source(load_encoder(encoder("imagenet", _spec("imagenet", "models/imagenet/resnet50.pth", "",
                                                            IMAGENET_NORM))), source)  # fmt: skip
    (tmp_path / "models/biovil").mkdir(parents=True)
    save_file({f"encoder.{k}": v.contiguous() for k, v in source.items()}, tmp_path / "models/biovil/w.safetensors")
    _equal_to_source(load_encoder(encoder("biovil", _spec("checkpoint", "models/biovil/w.safetensors", "encoder.",
                                                          IMAGENET_NORM))), source)  # fmt: skip


def test_an_encoder_trained_here_reads_its_stage_output_with_the_pipeline_normalisation(tmp_path, monkeypatch):
    from mflag.models import resnet50_trunk, save_trunk

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(2)
    net = resnet50_trunk()
    save_trunk(net, tmp_path / "models/convirt/vision_encoder.safetensors", init="convirt")
    enc = encoder("convirt", _spec("convirt", None))
    assert (enc.mean, enc.std) == PIPELINE_NORMALISATION and enc.label == "ConVIRT-style"
    _equal_to_source(load_encoder(enc), net.state_dict())


def test_a_missing_file_names_the_path_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EncoderError, match=r"models/imagenet/resnet50\.pth.*download\.pytorch\.org"):
        load_encoder(encoder("imagenet", _spec("imagenet", "models/imagenet/resnet50.pth", "", IMAGENET_NORM)))
    with pytest.raises(EncoderError, match=r"models/mflag/vision_encoder\.safetensors.*dvc repro pretrain"):
        load_encoder(encoder("mflag", _spec("mflag", None)))


def test_a_wrong_prefix_names_the_prefixes_the_file_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/gloria").mkdir(parents=True)
    torch.save({"state_dict": {f"gloria.img_encoder.model.{k}": v for k, v in _source().items()}},
               tmp_path / "models/gloria/chexpert_resnet50.ckpt")  # fmt: skip
    spec = _spec("checkpoint", "models/gloria/chexpert_resnet50.ckpt", "img_encoder.model.", IMAGENET_NORM)
    with pytest.raises(EncoderError, match=r"'gloria\.img_encoder\.model\.'"):
        load_encoder(encoder("gloria", spec))


def test_a_file_that_is_not_a_weights_only_state_dict_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/x").mkdir(parents=True)
    (tmp_path / "models/x/w.pth").write_bytes(b"not a torch file")
    with pytest.raises(EncoderError, match=r"models/x/w\.pth: cannot be read"):
        load_encoder(encoder("x", _spec("checkpoint", "models/x/w.pth", "", IMAGENET_NORM)))


def _params_with(tmp_path, name: str, entry: dict):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["encoders"][name] = entry
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load(path)


@pytest.mark.parametrize("name,entry,match", [
    ("mflag", {"kind": "mflag", "weights": "models/mflag/x.pth", "key_prefix": "", "mean": None, "std": None},
     "written by this pipeline"),
    ("mine", {"kind": "random", "weights": None, "key_prefix": "", "mean": None, "std": None}, "must be named random"),
    ("mgca", {"kind": "checkpoint", "weights": "/data/mgca.ckpt", "key_prefix": "", **IMAGENET_NORM}, "under models/mgca/"),
    ("mgca", {"kind": "checkpoint", "weights": "models/mgca/../x.ckpt", "key_prefix": "", **IMAGENET_NORM}, "under models/mgca/"),
    ("mgca", {"kind": "checkpoint", "weights": "models/mgca/m.ckpt", "key_prefix": "", "mean": None, "std": None},
     "give mean, std"),
    ("random", {"kind": "checkpoint", "weights": "models/random/m.ckpt", "key_prefix": "", **IMAGENET_NORM},
     "trained here"),
    ("Bad-Name", {"kind": "checkpoint", "weights": "models/Bad-Name/m.ckpt", "key_prefix": "", **IMAGENET_NORM},
     "lower-case"),
])  # fmt: skip
def test_bad_encoder_entries_are_refused_with_the_key(tmp_path, name, entry, match):
    with pytest.raises(ParamsError, match=match):
        _params_with(tmp_path, name, entry)


def test_the_documented_imagenet_entry_is_valid(tmp_path):
    entry = {"kind": "imagenet", "weights": "models/imagenet/resnet50.pth", "key_prefix": "", **IMAGENET_NORM}
    assert _params_with(tmp_path, "imagenet", entry).encoders["imagenet"].weights == "models/imagenet/resnet50.pth"
    assert load(REPO / "configs/paper.yaml").encoders["imagenet"].kind == "imagenet"

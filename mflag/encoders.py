"""The encoders the study compares (params ``encoders``): where each one's weights are and how to read them.

Every encoder ``<name>`` lives in ``models/<name>/`` (its fine-tune cells depend on that folder in dvc.yaml):

* ``mflag``, ``convirt``, ``random``: trained (or drawn) by a stage of the DAG, which writes
  ``models/<name>/vision_encoder.safetensors`` with :func:`mflag.models.save_trunk`; inputs scaled as in
  pretraining (grey in [0, 1], mean = std = 0.5).
* ``imagenet``: torchvision's ResNet-50 ImageNet state dict, a file the user supplies.
* ``checkpoint``: any ResNet-50 state dict (a torch file, a Lightning ``.ckpt`` with a ``state_dict``, or
  safetensors) whose trunk keys carry ``key_prefix``; the released weights of M-FLAG, MGCA, GLoRIA, ConVIRT
  or BioViL go through the same splits and protocols this way.

:func:`load_encoder` returns the trunk's state dict (torchvision's keys, no ``fc``) and its normalisation,
or raises :class:`EncoderError` naming the file and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mflag.models import resnet50_trunk

PIPELINE_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # mean, std of the encoders trained here
ENCODER_FILE = "vision_encoder.safetensors"
LABELS = {"mflag": "M-FLAG", "convirt": "ConVIRT-style", "random": "Random", "imagenet": "ImageNet"}
WHERE = {
    "mflag": "run the pretrain stage first (dvc repro pretrain)",
    "convirt": "run the pretrain_convirt stage first (dvc repro pretrain_convirt)",
    "random": "run the init_random stage first (dvc repro init_random)",
    "imagenet": "copy torchvision's ResNet-50 ImageNet weights there (resnet50-0676ba61.pth, IMAGENET1K_V1, or "
    "resnet50-11ad3fa6.pth, V2, from download.pytorch.org on a machine with internet; nothing is downloaded here)",
    "checkpoint": "copy the released checkpoint there (see docs/contracts.md, 'Encoders', for the key prefixes and "
    "normalisations of the field's checkpoints)",
}


class EncoderError(Exception):
    """An encoder whose weights are missing or do not fit a ResNet-50 trunk; the message names the file."""


@dataclass(frozen=True)
class Encoder:
    name: str
    kind: str
    path: Path  # the weights file the cells read
    key_prefix: str  # stripped from the file's keys; only keys with it are read
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def label(self) -> str:
        """The encoder's name in tables and plots."""
        return LABELS.get(self.name, self.name) if self.kind != "checkpoint" else self.name


def encoder(name: str, spec) -> Encoder:
    """The encoder `name` of params ``encoders`` (an EncoderParams)."""
    if spec.weights is None:
        path, (mean, std) = Path("models") / name / ENCODER_FILE, PIPELINE_NORMALISATION
    else:
        path, mean, std = Path(spec.weights), tuple(spec.mean), tuple(spec.std)
    return Encoder(name, spec.kind, path, spec.key_prefix, mean, std)


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # runs no code from the file
    except Exception as err:  # noqa: BLE001 -- whatever the reason, the file cannot be used as it is
        raise EncoderError(
            f"{path}: cannot be read as a weights-only torch file ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "save its state dict alone (torch.save(ckpt['state_dict'], ...)) or as safetensors"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a PyTorch Lightning checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderError(f"{path}: not a state dict (a mapping of names to tensors)")
    return obj


def _prefixes(keys) -> list[str]:
    """Prefixes under which a ResNet stem is found (``<prefix>conv1.weight`` next to ``<prefix>layer1...``)."""
    found = {k[: -len("conv1.weight")] for k in keys if k.endswith("conv1.weight") and "layer" not in k}
    return sorted(p for p in found if any(k.startswith(p + "layer4.") for k in keys))


def load_encoder(enc: Encoder) -> dict[str, torch.Tensor]:
    """The ResNet-50 trunk's state dict of `enc` (torchvision's keys without ``fc``), checked to fit exactly."""
    if not enc.path.is_file():
        raise EncoderError(f"encoder {enc.name}: weights file not found: {enc.path}; {WHERE[enc.kind]}")
    state = raw = _read(enc.path)
    if enc.kind in ("imagenet", "checkpoint"):
        state = {k[len(enc.key_prefix):]: v for k, v in state.items() if k.startswith(enc.key_prefix)}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    net = resnet50_trunk()
    mine = net.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    wrong = [k for k in mine if k in state and state[k].shape != mine[k].shape]
    if missing or unexpected or wrong:
        hint = ""
        if enc.kind == "checkpoint":
            found = _prefixes(list(raw))
            hint = (f"; ResNet trunks in that file sit under the key prefix(es) {', '.join(map(repr, found))}"
                    if found else "; no ResNet trunk (conv1 ... layer4) was found in that file")
        raise EncoderError(
            f"encoder {enc.name}: {enc.path} is not a ResNet-50 trunk under key prefix {enc.key_prefix!r} "
            f"({len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
            f"{len(wrong)} of another shape {wrong[:2]}){hint}"
        )
    return {k: state[k].to(mine[k].dtype).contiguous() for k in mine}

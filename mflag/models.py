"""The M-FLAG model of the reference code: a ResNet-50 trunk and two projection heads.

image:  ResNet-50 without fc -> h_img (B, 2048) -> proj_img: Linear-BN-ReLU-Linear-BN(no affine) -> z_img
text:   frozen LM embedding (B, D_lm), cached upstream -> proj_txt: the same shape of head -> z_txt;
        or, with a text tower (the LM's top layers training: ConVIRT, M-FLAG's free_layers), the cached
        lower-layer token states -> tower -> (B, D_lm) -> proj_txt
No loss is computed here (see mflag/losses.py). The ConVIRT baseline is this model with a tower and
another loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load_file, save_file

FEATURE_DIM = 2048  # ResNet-50's pooled feature width


class VisionInitError(Exception):
    """An encoder init that cannot be honoured (missing or mismatched weights), naming the file and what to do."""


def resnet50_trunk() -> nn.Module:
    """torchvision's ResNet-50 (random init, drawn from torch's global generator) with its classifier
    replaced by an identity: (B, 3, H, W) -> (B, 2048). Its state dict is torchvision's without ``fc.*``.

    The 2048 -> 1000 classifier is still built (and drawn) by torchvision before it is dropped, so a seed
    gives the trunk weights ``torchvision.models.resnet50()`` gives.
    """
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()
    return net


def load_imagenet_trunk(path: str | Path) -> nn.Module:
    """ResNet-50 from a local copy of torchvision's ImageNet weights (a state dict file)."""
    path = Path(path)
    if not path.is_file():
        raise VisionInitError(
            f"model.vision.init: imagenet needs torchvision's ResNet-50 ImageNet weights at {path} "
            f"(model.vision.imagenet_weights), and there is no file there. No download happens here: fetch "
            f"resnet50-11ad3fa6.pth (IMAGENET1K_V2) or resnet50-0676ba61.pth (V1) on a machine with internet, "
            f"copy it to that path, or use model.vision.init: random."
        )
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    net = resnet50_trunk()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VisionInitError(f"{path}: not a torchvision ResNet-50 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net


def build_trunk(init: str, imagenet_weights: str, seed: int) -> nn.Module:
    """A ResNet-50 trunk: `random` (torchvision's init, drawn from `seed`) or `imagenet`."""
    if init == "imagenet":
        return load_imagenet_trunk(imagenet_weights)
    if init != "random":
        raise VisionInitError(f"model.vision.init must be random or imagenet, got {init!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resnet50_trunk()


def save_trunk(net: nn.Module, path: str | Path, init: str) -> None:
    """The trunk's weights as safetensors, atomically, with one metadata entry {"init": init}.

    One entry, not a free dict: safetensors writes several metadata keys in an order that changes from
    process to process, and the file's bytes (its DVC hash) would change between identical runs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp), metadata={"init": init})
    tmp.replace(path)


def load_trunk(path: str | Path) -> nn.Module:
    """A ResNet-50 trunk from an encoder file written by save_trunk (pretrain or init_random)."""
    path = Path(path)
    if not path.is_file():
        raise VisionInitError(f"encoder file not found: {path}")
    net = resnet50_trunk()
    try:
        missing, unexpected = net.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise VisionInitError(f"{path}: not a ResNet-50 trunk written by save_trunk: {err}") from err
    if missing or unexpected:
        raise VisionInitError(
            f"{path}: not a ResNet-50 trunk written by save_trunk ({len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]})"
        )
    return net


class Projector(nn.Sequential):
    """Linear -> BN -> ReLU -> Linear -> BN without affine, as in the reference code."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__(
            nn.Linear(d_in, d_hidden),
            nn.BatchNorm1d(d_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(d_hidden, d_out),
            nn.BatchNorm1d(d_out, affine=False),
        )


@dataclass
class MFLAGOutput:
    h_img: torch.Tensor  # (B, 2048) backbone features
    z_img: torch.Tensor  # (B, proj_dim)
    z_txt: torch.Tensor  # (B, proj_dim)


def trunk_stages(trunk: nn.Module, k: int) -> list[nn.Module]:
    """The stem (conv1, bn1) and the first `k` residual stages (layer1..layerk) of a ResNet trunk."""
    if not 0 <= k <= 4:
        raise ValueError(f"frozen stages must be 0..4, got {k}")
    return ([trunk.conv1, trunk.bn1] if k else []) + [getattr(trunk, f"layer{i}") for i in range(1, k + 1)]


class MFLAG(nn.Module):
    """The trunk and both projectors. `frozen_stages` k > 0 keeps the stem and layer1..layerk at their
    init (no gradient, batch norm in eval mode, also under `train()`); 0, the reference, trains all.
    `text_tower` (mflag.text.TextTower): the text input is token states, run through it before proj_txt;
    None: the text input is the cached embedding, and the state dict holds no text weights."""

    def __init__(self, trunk: nn.Module, text_dim: int, proj_hidden: int, proj_dim: int, feature_dim: int = FEATURE_DIM,
                 frozen_stages: int = 0, text_tower: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.encoder = trunk
        self.proj_img = Projector(feature_dim, proj_hidden, proj_dim)
        self.proj_txt = Projector(text_dim, proj_hidden, proj_dim)
        self.text_tower = text_tower
        self._frozen = trunk_stages(trunk, frozen_stages)
        for m in self._frozen:
            m.requires_grad_(False)
            m.eval()

    def train(self, mode: bool = True) -> "MFLAG":
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(images).flatten(1)  # (B, 2048)
        return h, self.proj_img(h)

    def encode_text(self, text) -> torch.Tensor:
        """`text`: cached embeddings (B, D_lm), or the tower's TokenStates where there is a tower."""
        return self.proj_txt(text if self.text_tower is None else self.text_tower(text))

    def forward(self, images: torch.Tensor, text) -> MFLAGOutput:
        h_img, z_img = self.encode_image(images)
        return MFLAGOutput(h_img=h_img, z_img=z_img, z_txt=self.encode_text(text))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

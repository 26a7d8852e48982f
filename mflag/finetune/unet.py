"""U-Net on a ResNet-50 trunk, the segmentation model of the MGCA protocol, without segmentation-models-pytorch.

Why not smp itself: importing it (timm, torchvision, huggingface_hub) adds about 5 s to every segmentation
cell's start-up on the 2-core demo machine, a minute over the twelve cells. The model is the one MGCA built
with ``smp.Unet("resnet50", classes=1)`` (smp 0.6 semantics), written out here:

- encoder: the ResNet-50 trunk (:class:`mflag.resnet.ResNet50`) read at six levels: the input itself, the
  stem (conv1, bn1, relu; stride 2), layer1 (after the max-pool; stride 4), layer2, layer3, layer4 (stride 32);
- decoder: five blocks from the deepest level up; each resizes its input (nearest) to the next level's side,
  concatenates that level as a skip (none for the last block, which reaches the input's side) and applies
  two 3x3 convolutions (no bias) with batch norm and ReLU; no centre block, no attention;
- head: one 3x3 convolution (with bias) to one logit map, no activation.

Module and parameter names are smp's (``encoder.*``, ``decoder.blocks.<i>.conv<j>.<0|1>.*``,
``segmentation_head.0.*``), so state dicts move between the two. Initialisation draws from the global RNG in
smp's order (the encoder's init, then each decoder convolution's and the head's default init, then smp's
re-initialisation: He-uniform fan-in for decoder convolutions, Xavier-uniform and zero bias for the head),
so one seed gives one set of weights in both. tests/test_unet.py checks names, weights and the forward pass
against smp.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as nnf

from mflag.resnet import EXPANSION, STAGES, ResNet50

# the six levels' channels: the input (3), the stem (64), layer1..layer4 (256 ... 2048)
ENCODER_CHANNELS = (3, 64) + tuple(width * EXPANSION for width, _, _ in STAGES)
DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's Unet default, as MGCA used it


class ResNet50Levels(ResNet50):
    """The ResNet-50 trunk returning its six feature levels, finest first (no pooling, no classifier)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        levels = [x]
        x = self.relu(self.bn1(self.conv1(x)))
        levels.append(x)
        x = self.layer1(self.maxpool(x))
        levels.append(x)
        for layer in (self.layer2, self.layer3, self.layer4):
            x = layer(x)
            levels.append(x)
        return levels


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(in_ch + skip_ch, out_ch)
        self.conv2 = _conv_bn_relu(out_ch, out_ch)

    def forward(self, x: torch.Tensor, size: tuple[int, int], skip: torch.Tensor | None) -> torch.Tensor:
        x = nnf.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UnetDecoder(nn.Module):
    """Five decoder blocks over the encoder's levels; ``forward(levels)`` reads level 0 only for its side."""

    def __init__(self, decoder_channels: tuple[int, ...], encoder_channels: tuple[int, ...] = ENCODER_CHANNELS):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels) - 1:
            raise ValueError(f"decoder_channels needs {len(encoder_channels) - 1} entries, got {len(decoder_channels)}")
        deep_first = encoder_channels[1:][::-1]  # 2048, 1024, 512, 256, 64
        ins = (deep_first[0],) + tuple(decoder_channels[:-1])
        skips = tuple(deep_first[1:]) + (0,)
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        sizes = [tuple(f.shape[-2:]) for f in levels][::-1]  # deepest first, ending with the input's side
        deep_first = levels[1:][::-1]
        x = deep_first[0]
        for i, block in enumerate(self.blocks):
            skip = deep_first[i + 1] if i + 1 < len(deep_first) else None
            x = block(x, sizes[i + 1], skip)
        return x


class Unet(nn.Module):
    """``encoder`` (levels) -> ``decoder`` -> ``segmentation_head``: (B, 3, H, W) -> (B, 1, H, W) logits.

    H and W must be multiples of 32. ``freeze_encoder()`` turns the encoder's gradients off and keeps it in
    eval mode through later ``train()`` calls (batch-norm statistics never move).
    """

    def __init__(self, decoder_channels: tuple[int, ...] = DECODER_CHANNELS):
        super().__init__()
        self.encoder = ResNet50Levels()
        del self.encoder.avgpool, self.encoder.fc  # parameter-free; the levels never reach them
        self.decoder = UnetDecoder(tuple(decoder_channels))
        self.segmentation_head = nn.Sequential(nn.Conv2d(decoder_channels[-1], 1, 3, padding=1))
        self._encoder_frozen = False
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        head = self.segmentation_head[0]
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)

    def freeze_encoder(self) -> None:
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self._encoder_frozen = True

    def train(self, mode: bool = True) -> "Unet":
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"Unet input sides must be multiples of 32, got {tuple(x.shape[-2:])}")
        return self.segmentation_head(self.decoder(self.encoder(x)))

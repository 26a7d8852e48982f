"""The frozen language model: locating, loading, freezing, and embedding against an independent reference;
the text tower (cached lower layers -> trainable top layers) against the LM's own forward."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mflag.text import (DEFAULT_LM, TextModelError, TextTower, TokenStates, embed_texts, load_frozen_lm,  # noqa: E402
                        lower_layer_states, resolve_lm_path)

TEXTS = [
    "No acute cardiopulmonary process.",
    "Heart size is mildly enlarged. There is a small left pleural effusion with adjacent atelectasis. "
    "No pneumothorax. Sternotomy wires are intact. Mild pulmonary vascular congestion without frank edema.",
    "Right lower lobe consolidation, concerning for pneumonia.",
    "Lines and tubes in standard position.",
]
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def enc():
    # One intra-op thread: these are tiny batches, and on a busy 2-core machine two threads that spin-wait
    # for each other are an order of magnitude slower. Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_frozen_lm(DEFAULT_LM, False)
    finally:
        torch.set_num_threads(threads)


def reference(enc, text: str, pooling: str, max_length: int = MAX_LENGTH) -> np.ndarray:
    """One text at a time, no padding at all: the plain forward pass the cached embedding must equal."""
    ids = enc.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**ids).last_hidden_state[0]
    return (hidden[0] if pooling == "cls" else hidden.mean(dim=0)).numpy()


# ------------------------------------------------------------------------------------ locating
def test_resolve_package_gives_model_folder():
    folder = Path(resolve_lm_path(DEFAULT_LM))
    assert folder.is_dir()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


def test_resolve_local_folder_without_config(tmp_path):
    assert resolve_lm_path(str(Path(resolve_lm_path(DEFAULT_LM)))) == resolve_lm_path(DEFAULT_LM)
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(TextModelError, match="config.json") as info:
        resolve_lm_path(str(empty))
    assert str(empty) in str(info.value)


def test_resolve_hub_id_unchanged_and_missing_package():
    assert resolve_lm_path("microsoft/BiomedVLP-CXR-BERT-general") == "microsoft/BiomedVLP-CXR-BERT-general"
    with pytest.raises(TextModelError, match="not installed"):
        resolve_lm_path("package:no-such-package-mflag-test")


# ------------------------------------------------------------------------------------- loading
def test_loaded_model_is_frozen(enc):
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())
    assert enc.dim == 384
    assert 22_000_000 < enc.n_params < 23_500_000


def test_hub_id_without_local_copy_fails_clearly(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TextModelError) as info:
        load_frozen_lm("microsoft/BiomedVLP-CXR-BERT-general", trust_remote_code=False)
    msg = str(info.value)
    assert "microsoft/BiomedVLP-CXR-BERT-general" in msg
    assert "trust_remote_code" in msg
    assert "available locally" in msg
    assert "huggingface-cli download" in msg


# ----------------------------------------------------------------------------------- embedding
def test_lm_untouched_by_embedding_and_training(enc):
    before = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
    emb = torch.from_numpy(embed_texts(enc, TEXTS, MAX_LENGTH, "cls", batch_size=2, progress=False))
    head = torch.nn.Linear(enc.dim, 8)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = head(emb).pow(2).mean()
    loss.backward()
    opt.step()
    assert head.weight.grad is not None
    after = enc.model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(p.grad is None for p in enc.model.parameters())
    assert not enc.model.training


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embeddings_match_unpadded_reference_in_input_order(enc, pooling):
    out = embed_texts(enc, TEXTS, MAX_LENGTH, pooling, batch_size=3, progress=False)
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 384)
    ref = np.stack([reference(enc, t, pooling) for t in TEXTS])
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    # Distinct texts give distinct rows, so a mix-up of the order would show above; and a reversed input
    # gives the reversed output.
    rev = embed_texts(enc, TEXTS[::-1], MAX_LENGTH, pooling, batch_size=3, progress=False)
    np.testing.assert_allclose(rev, out[::-1], atol=1e-5, rtol=0)


def test_long_text_is_truncated(enc):
    long_text = " ".join(["bilateral patchy airspace opacities"] * 40)
    n_tokens = len(enc.tokenizer(long_text)["input_ids"])
    assert n_tokens > 32
    out = embed_texts(enc, [TEXTS[0], long_text], 32, "mean", batch_size=2, progress=False)
    np.testing.assert_allclose(out[1], reference(enc, long_text, "mean", max_length=32), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[0], reference(enc, TEXTS[0], "mean", max_length=32), atol=1e-5, rtol=0)
    # The truncated text really lost tokens: it differs from the embedding with a larger budget.
    full = embed_texts(enc, [long_text], 256, "mean", batch_size=1, progress=False)
    assert not np.allclose(out[1], full[0], atol=1e-3)


def test_deterministic_and_edge_cases(enc):
    a = embed_texts(enc, TEXTS, MAX_LENGTH, "cls", batch_size=2, progress=False)
    b = embed_texts(enc, TEXTS, MAX_LENGTH, "cls", batch_size=2, progress=False)
    assert np.array_equal(a, b)
    enc.model.train()  # a caller leaving the module in train mode must not switch dropout on
    c = embed_texts(enc, TEXTS, MAX_LENGTH, "cls", batch_size=2, progress=False)
    assert np.array_equal(a, c)
    assert not enc.model.training

    empty = embed_texts(enc, [], MAX_LENGTH, "cls", batch_size=2, progress=False)
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(ValueError, match="cls.*mean"):
        embed_texts(enc, TEXTS, MAX_LENGTH, "max", batch_size=2, progress=False)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        embed_texts(enc, ["ok", float("nan")], MAX_LENGTH, "cls", batch_size=2, progress=False)


# ----------------------------------------------------------------------------------- revision
def _record_from_pretrained(monkeypatch) -> list[tuple[str, dict]]:
    """Wrap transformers' AutoModel / AutoTokenizer.from_pretrained: record each call's kwargs, then load."""
    import transformers

    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def wrapper(klass, *args, _original=original, **kwargs):
            calls.append((klass.__name__, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(wrapper))
    return calls


def test_revision_is_passed_to_the_model_and_the_tokenizer(monkeypatch):
    calls = _record_from_pretrained(monkeypatch)
    commit = "0123456789abcdef0123456789abcdef01234567"
    enc = load_frozen_lm(DEFAULT_LM, False, revision=commit)
    assert sorted(name for name, _ in calls) == ["AutoModel", "AutoTokenizer"]
    assert all(kwargs["revision"] == commit for _, kwargs in calls)
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in calls)
    assert enc.dim == 384  # a local folder loads whatever the revision (transformers ignores it there)


def test_remote_code_without_revision_is_refused_before_loading(monkeypatch):
    calls = _record_from_pretrained(monkeypatch)
    with pytest.raises(TextModelError, match="revision") as info:
        load_frozen_lm(DEFAULT_LM, trust_remote_code=True)
    assert "model.text.revision" in str(info.value)
    assert calls == []  # nothing was loaded, so no repository code ran


# -------------------------------------------------------------------------------- text tower
@pytest.mark.parametrize("free_layers", [1, 3, 6])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_tower_over_cached_lower_layers_equals_the_full_forward(enc, pooling, free_layers):
    """Lower layers once (batched, padded), the top layers in eval mode on a re-padded batch of them,
    pooled: the LM's own last_hidden_state of each text alone, pooled."""
    states = lower_layer_states(enc, TEXTS, free_layers, MAX_LENGTH, batch_size=3)
    lengths = [len(enc.tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in TEXTS]
    assert [tuple(s.shape) for s in states] == [(n, 384) for n in lengths]  # unpadded, in input order
    tower = TextTower(enc, free_layers, pooling, key="convirt.text_free_layers").eval()
    ref = np.stack([reference(enc, t, pooling) for t in TEXTS])
    # another batch and padding than the cache's: each text three times, shuffled, so that the tower's
    # length groups hold rows of several lengths
    rows = np.random.default_rng(free_layers).permutation(np.arange(12) % len(TEXTS))
    with torch.no_grad():
        out = tower(TokenStates.pad([states[i] for i in rows])).numpy()
    np.testing.assert_allclose(out, ref[rows], atol=2e-5, rtol=0)


def test_tower_trains_copies_of_exactly_the_top_layers(enc):
    tower = TextTower(enc, 2, "cls", key="mflag.text_free_layers")
    top = [(n, p) for n, p in enc.model.named_parameters() if n.startswith(("encoder.layer.4.", "encoder.layer.5."))]
    mine = list(tower.named_parameters())
    # encoder.layer.4.<name> -> layers.0.<name>, encoder.layer.5.<name> -> layers.1.<name>
    assert [n for n, _ in mine] == [f"layers.{int(n.split('.')[2]) - 4}.{n.split('.', 3)[3]}" for n, _ in top]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(mine, top))  # the pretrained weights
    assert all(p.requires_grad for _, p in mine)
    # a step of the tower in train mode (dropout on) reaches every one of its weights and none of the LM's
    states = lower_layer_states(enc, TEXTS, 2, MAX_LENGTH, batch_size=4)
    tower.train()(TokenStates.pad(states)).pow(2).mean().backward()
    assert all(p.grad is not None for _, p in mine)
    assert all(not p.requires_grad and p.grad is None for p in enc.model.parameters()) and not enc.model.training


@pytest.mark.parametrize("key", ["convirt.text_free_layers", "mflag.text_free_layers"])
def test_more_free_layers_than_the_model_has_is_refused_naming_the_key(enc, key):
    with pytest.raises(TextModelError) as info:
        TextTower(enc, 7, "cls", key=key)
    assert str(info.value) == f"{key} is 7, but the language model has 6 layers"

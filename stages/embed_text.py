"""Stage `embed_text`: encode every mimic report once with the frozen language model.

Writes data/embeddings/mimic.npy (float32, row-aligned with data/cache/mimic/index.csv) and
mimic.json (the model, its width and parameter count, the pooling and the length used).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mflag.io import atomic_write, write_json
from mflag.params import load_or_exit
from mflag.text import TextModelError, embed_texts, load_frozen_lm


def main() -> None:
    params = load_or_exit()
    cfg = params.model.text
    index = pd.read_csv("data/cache/mimic/index.csv", dtype=str, keep_default_na=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        enc = load_frozen_lm(cfg.name_or_path, cfg.trust_remote_code, device=device, revision=cfg.revision)
    except TextModelError as err:
        sys.exit(f"error: embed_text: {err}")
    emb = embed_texts(enc, index["text"].tolist(), cfg.max_length, cfg.pooling, cfg.batch_size, device=device)
    out = Path("data/embeddings")
    buf = io.BytesIO()
    np.save(buf, emb.astype(np.float32))
    atomic_write(out / "mimic.npy", buf.getvalue())
    write_json(
        out / "mimic.json",
        {"name_or_path": cfg.name_or_path, "revision": cfg.revision, "dim": enc.dim, "lm_parameters": enc.n_params,
         "pooling": cfg.pooling, "max_length": cfg.max_length, "rows": len(emb)},
    )  # fmt: skip
    print(f"embed_text: {len(emb)} reports -> {emb.shape[1]}-d ({cfg.name_or_path})")


if __name__ == "__main__":
    main()

"""The SIIM-ACR stage-1 run-length encoding, writer side (the reader's decoder is in mflag.data.siim).

Space-separated ``start length`` pairs; each start counts from the end of the previous run (the
first from 0), over the column-major (Fortran order) flattened image; ``-1`` for an empty mask.
"""

from __future__ import annotations

import numpy as np

EMPTY_RLE = "-1"


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (nonzero = foreground) in the stage-1 format; ``'-1'`` if empty."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    flat = (m != 0).ravel(order="F").astype(np.int8)
    padded = np.concatenate([[0], flat, [0]])
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) == 0:
        return EMPTY_RLE
    out: list[str] = []
    prev_end = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        out += [str(s - prev_end), str(e - s)]
        prev_end = e
    return " ".join(out)

"""Sharing the frozen encoder's features of a job's valid and test splits between its three fractions.

The encoder is frozen and the valid and test rows do not depend on the data fraction, so the 1, 10 and
100 % cells of a job and init would each compute the same features of those splits. The segmenter and
the detector take a ``memo(split, compute)`` callable: :func:`no_memo` always computes;
:class:`FileMemo` stores the result under a key the caller derives from everything the features depend
on, and loads it on the next call with the same key.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import torch

from mflag.io import atomic_write

FeatureMemo = Callable[[str, Callable[[], Any]], Any]


def no_memo(split: str, compute: Callable[[], Any]) -> Any:
    return compute()


class FileMemo:
    """``memo(split, compute)`` backed by ``<folder>/<prefix>-<split>.pt`` (tensors, lists and tuples of them).

    A file is written with :func:`mflag.io.atomic_write`, so an interrupted run leaves either a complete
    file or none. ``prefix`` must change whenever the features would (encoder weights, images,
    rows, input size, precision, batch size). After writing, files in ``folder`` that match the glob
    ``replaces`` and belong to another prefix are deleted (the features of an encoder that a later run
    replaced); a file deleted under a concurrent reader is computed again, not an error.
    """

    def __init__(
        self, folder: str | Path, prefix: str, device: torch.device | str = "cpu", replaces: str | None = None
    ):
        self.folder, self.prefix, self.device, self.replaces = Path(folder), prefix, torch.device(device), replaces

    def __call__(self, split: str, compute: Callable[[], Any]) -> Any:
        path = self.folder / f"{self.prefix}-{split}.pt"
        try:
            return torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError:
            pass
        value = compute()
        buf = io.BytesIO()
        torch.save(value, buf)
        atomic_write(path, buf.getvalue())
        if self.replaces:
            for old in self.folder.glob(self.replaces):
                if not old.name.startswith(f"{self.prefix}-"):
                    old.unlink(missing_ok=True)
        return value

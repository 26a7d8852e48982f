"""Sharing the frozen encoder's features of a job's valid and test splits between its three fractions.

The encoder is frozen and the valid and test rows do not depend on the data fraction, so the 1, 10 and
100 % cells of a job and encoder, which run in one process (``finetune_<task>@<dataset>-<encoder>``), need those
features once. The segmenter and the detector take a ``memo(split, compute)`` callable: :func:`no_memo`
always computes; :class:`MemoryMemo` keeps the first result of each split in memory for the process.
"""

from __future__ import annotations

from typing import Any, Callable

FeatureMemo = Callable[[str, Callable[[], Any]], Any]


def no_memo(split: str, compute: Callable[[], Any]) -> Any:
    return compute()


class MemoryMemo:
    """``memo(split, compute)`` that computes each split once and returns the same object afterwards.

    One instance serves one encoder and one job's settings (the caller makes a new one otherwise).
    """

    def __init__(self) -> None:
        self.store: dict[str, Any] = {}

    def __call__(self, split: str, compute: Callable[[], Any]) -> Any:
        if split not in self.store:
            self.store[split] = compute()
        return self.store[split]

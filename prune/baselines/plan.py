"""What a depth-pruning method does to a model: a :class:`Plan` of the blocks that remain."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from chiptuning.errors import ChipTuningError


@dataclass
class Plan:
    """What a method does to the model.

    Attributes:
        groups: for each block of the result, the original blocks (1-based) it stands for: one
            block kept, several merged, or a span replaced by a trained block.
        removed: original blocks that no longer exist as they were (deleted, merged or replaced).
        details: scores, thresholds and training metrics, for the record.
        blocks: the result's block modules, in order (None: the original blocks per ``groups``).
    """

    method: str
    groups: list[list[int]]
    removed: list[int]
    details: dict[str, Any] = field(default_factory=dict)
    blocks: list[nn.Module] | None = None


def check_n(n: int, L: int, method: str) -> int:
    """``n`` as an int, if ``method`` can remove n of L blocks (1..L-1)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= L - 1:
        raise ChipTuningError(f"{method}: cannot remove {n!r} of {L} blocks (choose 1..{L - 1})")
    return int(n)


def kept_groups(L: int, removed: Sequence[int]) -> list[list[int]]:
    """One group per block of 1..L not in ``removed``."""
    gone = set(removed)
    return [[i] for i in range(1, L + 1) if i not in gone]


def select_lowest(scores: np.ndarray, n: int) -> list[int]:
    """1-based indices of the ``n`` lowest scores (ties: the lower block first)."""
    return sorted(int(i) + 1 for i in np.argsort(np.asarray(scores), kind="stable")[:n])

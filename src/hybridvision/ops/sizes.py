"""Size arguments: one helper for every module that takes ``int | (H, W)``."""
from __future__ import annotations

import operator
from typing import Sequence, Union

Size2 = Union[int, Sequence[int]]


def pair(size: Size2, what: str = "size") -> tuple[int, int]:
    """``n`` or ``(h, w)`` -> ``(h, w)``, both positive ints (numpy / torch integers accepted).

    Raises ValueError naming ``what`` and the value for anything else (floats, wrong length, values < 1).
    """
    items = (size, size) if not isinstance(size, Sequence) else tuple(size)
    try:
        out = tuple(operator.index(s) for s in items)
    except TypeError:
        out = ()
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"{what} must be a positive int or a (height, width) pair of positive ints; got {size!r}")
    return out  # type: ignore[return-value]

"""The weights of one generator call, as one record: their names and order are defined here."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["GeneratorWeights", "WEIGHT_NAMES", "ANCHOR_NAMES"]


class GeneratorWeights(NamedTuple):
    """The [A, ...] layout: the adapter axis first, one row per adapter of the call.

    Attributes:
        w_down: [A, d, m]; w_pool: [A, m, T]; rat_num: [A, p+1] (a_0..a_p); rat_den: [A, q]
        (b_1..b_q); w_up: [A, m, d]; anchor: [A, T, d] or None (the paper's form: zero);
        anchor_scale: [A] or None (one).
    """

    w_down: Tensor
    w_pool: Tensor
    rat_num: Tensor
    rat_den: Tensor
    w_up: Tensor
    anchor: Tensor | None = None
    anchor_scale: Tensor | None = None


WEIGHT_NAMES = GeneratorWeights._fields[:5]
ANCHOR_NAMES = GeneratorWeights._fields[5:]

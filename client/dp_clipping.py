"""Client-side clipping for Flower's client-side DP wrappers."""

from __future__ import annotations

import numpy as np
from flwr.supercore.differential_privacy import (
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
)


def clip_update(
    new: dict[str, np.ndarray], base: dict[str, np.ndarray], *, clipping_norm: float,
    adaptive: bool,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Clip ``new - base`` to L2 norm ``clipping_norm`` with Flower's DP helpers.

    Done here rather than with Flower's clipping mods so that the clipped update can
    still be compressed (the mods expect the plain arrays on the wire). Adaptive
    clipping also reports Flower's norm bit (was the update clipped?).
    """
    names = list(new)
    values = [new[k] for k in names]
    if adaptive:
        norm_bit = compute_adaptive_clip_model_update(values, [base[k] for k in names],
                                                      clipping_norm)
        return dict(zip(names, values, strict=True)), {KEY_NORM_BIT: int(norm_bit)}
    compute_clip_model_update(values, [base[k] for k in names], clipping_norm)
    return dict(zip(names, values, strict=True)), {}

"""Expert kernels that start as the identity: airbench's "dirac" initialisation, for expert blocks.

In each expert of a block, output filter i < min(in, out) becomes a 1 at input channel i, kernel
centre; the other filters keep their random initialisation. Every expert then computes the same
identity on those channels, so the attention-weighted merge does too, whatever the attention: the
block starts by passing its input on, and training the other filters adds to that. airbench found
that this saves about a seventh of the epochs to 94 % (21 -> 18). Computed on canonical (PyTorch
layout) tensors in numpy, so both frameworks apply the same change.
"""

from __future__ import annotations

import numpy as np


def dirac_expert_kernels(kernels: np.ndarray) -> np.ndarray:
    """(K, out, in, k, k) expert kernels -> a copy whose first min(in, out) filters are identities."""
    experts, c_out, c_in, k, _ = kernels.shape
    identity = min(c_out, c_in)
    result = np.array(kernels, copy=True)
    result[:, :identity] = 0
    result[:, np.arange(identity), np.arange(identity), k // 2, k // 2] = 1
    return result


def dirac_weights(canonical: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The expert kernels of a model's canonical weights, each made dirac (to pass to replace_weights)."""
    return {name: dirac_expert_kernels(value) for name, value in canonical.items() if name.endswith(".kernels")}

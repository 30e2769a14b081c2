"""The dirac expert-kernel initialisation: each block starts as the identity on its first channels."""

import numpy as np
import torch

from expert_core.dirac import dirac_expert_kernels, dirac_weights


def test_dirac_kernels_pass_the_first_channels_on_and_keep_the_other_filters():
    rng = np.random.default_rng(0)
    kernels = rng.standard_normal((3, 6, 4, 3, 3)).astype(np.float32)  # K=3, out 6 > in 4
    dirac = dirac_expert_kernels(kernels)
    x = torch.from_numpy(rng.standard_normal((2, 4, 5, 5)).astype(np.float32))
    for expert in dirac:
        y = torch.nn.functional.conv2d(x, torch.from_numpy(expert), padding=1)
        torch.testing.assert_close(y[:, :4], x, rtol=0, atol=0)
    np.testing.assert_array_equal(dirac[:, 4:], kernels[:, 4:])
    assert not np.array_equal(dirac[:, :4], kernels[:, :4])


def test_dirac_keeps_as_many_identities_as_there_are_outputs_when_a_block_narrows():
    kernels = np.random.default_rng(1).standard_normal((2, 3, 5, 1, 1))
    dirac = dirac_expert_kernels(kernels)
    np.testing.assert_array_equal(dirac[:, :, :, 0, 0], np.broadcast_to(np.eye(3, 5), (2, 3, 5)))


def test_dirac_weights_change_the_expert_kernels_only():
    tensors = {"stem.conv.weight": np.ones((8, 3, 3, 3)), "blocks.0.kernels": np.ones((2, 8, 8, 3, 3)),
               "blocks.0.bn.bias": np.ones(8)}
    changed = dirac_weights(tensors)
    assert list(changed) == ["blocks.0.kernels"]
    np.testing.assert_array_equal(changed["blocks.0.kernels"], dirac_expert_kernels(tensors["blocks.0.kernels"]))
    assert not np.array_equal(changed["blocks.0.kernels"], tensors["blocks.0.kernels"])

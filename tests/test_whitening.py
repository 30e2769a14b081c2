"""The whitening stem's filters decorrelate the real patches they were fitted on.
(That both frameworks start from them: tests/test_training.py.)"""

import numpy as np
import pytest

from expert_core.whitening import PATCH_IMAGES, WHITENING_EPS, patch_covariance, whitening_stem_kernel


def test_the_stem_filters_whiten_the_patches_they_were_fitted_on(cifar10):
    images = cifar10.train_images[:PATCH_IMAGES]
    kernel = whitening_stem_kernel(images, 3, 32)
    np.testing.assert_array_equal(kernel[1::2], -kernel[0::2])
    filters = kernel[0::2].reshape(16, 27).astype(np.float64)
    covariance = patch_covariance(images, 3)
    responses = filters @ covariance @ filters.T
    # Variance lambda / (lambda + eps) along the 16 leading eigenvectors; uncorrelated to float32 rounding.
    leading = np.sort(np.linalg.eigvalsh(covariance))[::-1][:16]
    np.testing.assert_allclose(np.diag(responses), leading / (leading + WHITENING_EPS), rtol=1e-5)
    np.testing.assert_allclose(responses - np.diag(np.diag(responses)), 0, atol=1e-5)


@pytest.mark.parametrize("channels", [31, 56])
def test_a_stem_that_cannot_be_whitened_is_refused_saying_why(channels):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=f"even number of channels, at most 54 .* found {channels}"):
        whitening_stem_kernel(images, 3, channels)

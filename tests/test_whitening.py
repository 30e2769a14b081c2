"""The whitening stem's filters decorrelate the real patches they were fitted on.
(That both frameworks start from them: tests/test_training.py.)"""

import numpy as np
import pytest

from expert_core.config import normalisation_table
from expert_core.whitening import PATCH_IMAGES, WHITENING_EPS, patch_covariance, whitening_stem_kernel


def stem_responses(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(N, H-k+1, W-k+1, O) float64: the OIHW kernel run as a valid convolution over the normalised
    images, tap by tap, so a patch order that disagrees with the kernel's layout cannot cancel out."""
    x = normalisation_table().astype(np.float64)[images, np.arange(3)]
    k = kernel.shape[-1]
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    return sum(np.einsum("nhwc,oc->nhwo", x[:, dy:dy + h, dx:dx + w], kernel[:, :, dy, dx].astype(np.float64))
               for dy in range(k) for dx in range(k))


def test_the_stem_filters_whiten_the_images_they_were_fitted_on(cifar10):
    images = cifar10.train_images[:PATCH_IMAGES]
    kernel = whitening_stem_kernel(images, 3, 32)
    np.testing.assert_array_equal(kernel[1::2], -kernel[0::2])
    responses = stem_responses(images, kernel[0::2]).reshape(-1, 16)
    covariance = np.cov(responses, rowvar=False)
    # Variance lambda / (lambda + eps) along the 16 leading eigenvectors; uncorrelated to float32 rounding.
    leading = np.sort(np.linalg.eigvalsh(patch_covariance(images, 3)))[::-1][:16]
    np.testing.assert_allclose(np.diag(covariance), leading / (leading + WHITENING_EPS), rtol=1e-5)
    np.testing.assert_allclose(covariance - np.diag(np.diag(covariance)), 0, atol=1e-5)


@pytest.mark.parametrize("channels", [31, 56])
def test_a_stem_that_cannot_be_whitened_is_refused_saying_why(channels):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=f"even number of channels, at most 54 .* found {channels}"):
        whitening_stem_kernel(images, 3, channels)

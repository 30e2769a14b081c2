"""A stem initialised from the data: its filters are the principal directions of image patches.

airbench's whitening first layer, fitted to this network's stem (k x k conv -> BatchNorm -> ReLU).
Each eigenvector v of the covariance of normalised k x k x 3 training patches gives two filters,
+v / sqrt(lambda + eps) and its negative, so that after the ReLU the stem passes both signs of the
leading components instead of random projections. Computed here, in numpy, once: both frameworks
start from the same numbers.
"""

from __future__ import annotations

import numpy as np

from expert_core.config import normalisation_table

# The training images a stem is fitted on (a fixed random sample, expert_core.training): about 900
# patches an image, so 1000 images estimate a 27 x 27 covariance far better than it needs.
PATCH_IMAGES = 1000
# Added to each eigenvalue: the last few are near zero (JPEG and 8-bit rounding), and would blow up.
WHITENING_EPS = 5e-4


def patch_covariance(images: np.ndarray, kernel_size: int) -> np.ndarray:
    """(3 k k, 3 k k) float64 covariance of the normalised k x k patches of uint8 NHWC images,
    each patch flattened in (channel, row, column) order, the order of an OIHW kernel's IHW."""
    x = normalisation_table().astype(np.float64)[images, np.arange(3)]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kernel_size, kernel_size), axis=(1, 2))
    patches = windows.reshape(-1, 3 * kernel_size * kernel_size)  # (n, rows, cols, 3, k, k) -> (n rows cols, 3 k k)
    return np.cov(patches, rowvar=False)


def whitening_stem_kernel(images: np.ndarray, kernel_size: int, out_channels: int) -> np.ndarray:
    """(out_channels, 3, k, k) float32: the leading out_channels / 2 whitened eigenvectors of the
    patch covariance of `images`, each followed by its negative."""
    dims = 3 * kernel_size * kernel_size
    if out_channels % 2 or out_channels // 2 > dims:
        raise ValueError(f"a whitening stem needs an even number of channels, at most {2 * dims} for "
                         f"{kernel_size} x {kernel_size} x 3 patches; found {out_channels}. Change "
                         "stem_channels, or keep the random stem initialisation.")
    eigenvalues, eigenvectors = np.linalg.eigh(patch_covariance(images, kernel_size))
    leading = np.argsort(eigenvalues)[::-1][:out_channels // 2]
    filters = (eigenvectors[:, leading] / np.sqrt(eigenvalues[leading] + WHITENING_EPS)).T
    paired = np.stack([filters, -filters], axis=1).reshape(out_channels, dims)
    return paired.reshape(out_channels, 3, kernel_size, kernel_size).astype(np.float32)

"""Small model configs the model tests of both frameworks share, each exercising other options."""

import numpy as np

from expert_core.config import BlockConfig, ModelConfig
from expert_core.portable import canonical_shapes

SHAPE_CONFIGS = {
    "1-block-K1-k1": ModelConfig(stem_channels=4, blocks=(BlockConfig(8),), num_experts=1, kernel_size=1),
    "2-blocks-residual-k5": ModelConfig(stem_channels=4, blocks=(BlockConfig(4, pool=False, residual=True),
                                                                 BlockConfig(8)), num_experts=2, kernel_size=5),
    "3-blocks-hidden": ModelConfig(stem_channels=4, blocks=(BlockConfig(6), BlockConfig(6, pool=False),
                                                            BlockConfig(8)), num_experts=4, classifier_hidden=16,
                                   dropout=0.2, num_classes=7),
}


def random_canonical_tensors(config: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical weights for `config` drawn from a fixed seed; the 0-d BatchNorm step counters zero."""
    rng = np.random.default_rng(0)
    return {key: rng.standard_normal(shape).astype(np.float32) if shape else np.zeros((), np.int64)
            for key, shape in canonical_shapes(config).items()}

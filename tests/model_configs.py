"""Small model configs the model tests of both frameworks share, each exercising other options."""

from expert_core.config import BlockConfig, ModelConfig

SHAPE_CONFIGS = {
    "1-block-K1-k1": ModelConfig(stem_channels=4, blocks=(BlockConfig(8),), num_experts=1, kernel_size=1),
    "2-blocks-residual-k5": ModelConfig(stem_channels=4, blocks=(BlockConfig(4, pool=False, residual=True),
                                                                 BlockConfig(8)), num_experts=2, kernel_size=5),
    "3-blocks-hidden": ModelConfig(stem_channels=4, blocks=(BlockConfig(6), BlockConfig(6, pool=False),
                                                            BlockConfig(8)), num_experts=4, classifier_hidden=16,
                                   dropout=0.2, num_classes=7),
}

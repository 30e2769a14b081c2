"""The one source of truth for the architecture, the training recipe and the presets.

Framework-free on purpose: `torch_reference` and `flax_expert` both read these dataclasses and
nothing else, so a preset means the same network and the same recipe on either side.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

NUM_CLASSES = 10
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# The usual CIFAR-10 train-set statistics; both frameworks normalise with exactly these.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def normalisation_table() -> np.ndarray:
    """(256, 3) float32: entry [v, c] is ((v / 255) - mean[c]) / std[c], computed in float64.

    Both frameworks look their inputs up here instead of computing the formula: done in float32 by
    each framework, it came out one bit apart for about half the pixels, and those bits decided
    which pixel of a near-tied max-pool window got the gradient.
    """
    values = np.arange(256, dtype=np.float64)[:, None] / 255
    return ((values - np.asarray(CIFAR10_MEAN)) / np.asarray(CIFAR10_STD)).astype(np.float32)


def check_raw_images(dtype, shape) -> None:
    """Both models take the raw uint8 NHWC batch and normalise it themselves (normalisation_table);
    a ValueError otherwise. `dtype` may be numpy's, JAX's or torch's."""
    if str(dtype).rsplit(".", 1)[-1] != "uint8" or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), found {dtype} of shape {tuple(shape)}; "
                         "pass the raw uint8 NHWC batch, not a normalised or NCHW one.")


MERGE_MODES = ("branches", "stacked", "aggregated", "auto")
# Aggregated does 1x instead of K x the conv FLOPs and, in Flax, turns XLA:CPU's slow convolutions
# into patches @ kernel in cache-sized chunks; README "Speed" and results/benchmark/ have the figures.
DEFAULT_MERGE = "auto"
# "auto", the default on both sides, picks per block by the size of the images the block sees:
# aggregated from AGGREGATE_MIN_PIXELS up, stacked below. An image's own kernel (9 C C' floats) is
# built, used and differentiated whatever the image's size; on 4x4 images it outweighs the K-fold
# FLOPs of one dense conv shared by the batch. 256 -> 256 channels, batch 128, forward + backward on
# the 2-core AMD EPYC: 4x4, aggregated / stacked 285 / 63 ms (PyTorch) and 111 / 91 ms (Flax);
# 8x8, 253 / 250 ms (PyTorch, another day: 311-323 / 256) and 190 / 524 ms (Flax).
AGGREGATE_MIN_PIXELS = 64
# Per backend, the most output channels per pixel "auto" aggregates (None: no bound); the kernel's
# size against the image's. With AVX-512, oneDNN's dense 3x3 convolutions run a reduced-multiply
# (Winograd-class) algorithm that a per-image kernel cannot use. 256 -> 256 channels on 8x8 images,
# batch 128, forward + backward, on the AVX-512 AMD EPYC: one PyTorch dense conv did its direct
# multiply-adds at 364 GFLOP/s, against 245 for numpy's 2048^2 matmul; stacked 256 ms, aggregated
# 311-323 ms (Flax: 524 / 190 ms). 64 -> 128 on 8x8 (the seed's third block): stacked 35 ms, aggregated
# 29 (results/benchmark/amd-avx512-torch-8x8-probe/). On the AVX2 AMD EPYC oneDNN has no such path:
# 256 -> 256 on 8x8, stacked 940 ms, aggregated 591 (results/benchmark/amd-avx2-before-after/). XLA:CPU's
# dense convolutions have none either. "torch-avx512" is PyTorch on a CPU whose ATen kernels use AVX-512
# (torch_reference.model.merge_backend).
AGGREGATE_MAX_CHANNELS_PER_PIXEL = {"flax": None, "torch": None, "torch-avx512": 2}
# Elements per image (its input or patches, output and own kernel) that one chunk of a chunked
# convolution takes at a time on the CPU, in either framework: about 6 MB of float32, which stays in
# cache where the whole batch's tensors stream through memory (results/benchmark/README.md has the
# figures). Flax computes two chunks at once on images of 16x16 pixels or fewer
# (flax_expert.model.SIDE_BY_SIDE_CHUNKS).
CPU_CHUNK_ELEMENTS = 1_500_000
# Fewer images a chunk than this make the per-image work too small, in either framework. Flax: on every
# block shape of the seed and fast presets, chunks of 2 ran 8-30 % slower than chunks of 4 (forward +
# backward). PyTorch, 256 -> 256 channels on 8x8 / 4x4 images, AMD EPYC with AVX2: chunks of 2 took
# 669 / 425 ms, chunks of 4 594 / 361 ms (medians of 10, interleaved).
MIN_CHUNK_IMAGES = 4
# Test images per forward pass of an evaluation.
EVAL_BATCH = 500


def check_merge(merge: str) -> str:
    """`merge`, if it names one of MERGE_MODES; a ValueError saying what to pick otherwise."""
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}; pick one of those.")
    return merge


def cpu_chunk_images(elements_per_image: int) -> int:
    """Images per chunk of a chunked convolution on the CPU, in either framework: as many as
    CPU_CHUNK_ELEMENTS holds, and at least MIN_CHUNK_IMAGES."""
    return max(MIN_CHUNK_IMAGES, CPU_CHUNK_ELEMENTS // elements_per_image)


def block_merge(merge: str, height: int, width: int, out_channels: int, backend: str) -> str:
    """The merge computation a block run by `backend` (a key of AGGREGATE_MAX_CHANNELS_PER_PIXEL) uses on
    height x width images with `out_channels`: `merge`, with "auto" resolved."""
    if backend not in AGGREGATE_MAX_CHANNELS_PER_PIXEL:
        raise ValueError(f"backend must be one of {sorted(AGGREGATE_MAX_CHANNELS_PER_PIXEL)}, got {backend!r}.")
    if merge != "auto":
        return merge
    pixels, bound = height * width, AGGREGATE_MAX_CHANNELS_PER_PIXEL[backend]
    if pixels < AGGREGATE_MIN_PIXELS or (bound is not None and out_channels > bound * pixels):
        return "stacked"
    return "aggregated"


# "bfloat16": the expert convolutions compute in bf16 from float32 parameters; BatchNorm, the expert
# branch, the classifier and the loss stay float32. A speed option for accelerators, never for parity.
# "float64": everything, optimiser state included, in float64: slow, and only for checking that two
# runs (one device against several) differ by rounding alone, which float32 cannot show.
PRECISIONS = ("float32", "bfloat16", "float64")


def parameter_dtype(precision: str) -> str:
    """The dtype parameters, BatchNorm statistics and optimiser state are kept in at a precision."""
    return "float64" if precision == "float64" else "float32"


@dataclass(frozen=True)
class BlockConfig:
    """One expert block: its output width, and whether it max-pools or adds a residual."""

    out_channels: int
    pool: bool = True
    residual: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """The expert-block CNN of ../shared/spec/ARCHITECTURE.md."""

    stem_channels: int = 32
    blocks: tuple[BlockConfig, ...] = (BlockConfig(32), BlockConfig(64), BlockConfig(128))
    kernel_size: int = 3
    num_experts: int = 4
    reduction: int = 4
    temperature: float = 1.0
    classifier_hidden: int = 0  # 0: GAP -> Dense(10); >0: GAP -> Dense -> ReLU -> Dropout -> Dense
    dropout: float = 0.0
    num_classes: int = NUM_CLASSES
    # PyTorch's convention, new = (1 - m) * old + m * batch, on both sides: flax_expert.model.BatchNorm
    # takes m as it is (Flax's own nn.BatchNorm would need 1 - m).
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5

    def __post_init__(self):
        problems = []
        if self.kernel_size % 2 != 1:
            problems.append(f"kernel_size must be odd for symmetric padding, got {self.kernel_size}")
        if self.num_experts < 1:
            problems.append(f"num_experts must be >= 1, got {self.num_experts}")
        if self.reduction < 1:
            problems.append(f"reduction must be >= 1, got {self.reduction}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not self.blocks:
            problems.append("a model needs at least one expert block")
        in_channels = self.stem_channels
        for i, block in enumerate(self.blocks):
            if block.residual and (block.pool or block.out_channels != in_channels):
                problems.append(
                    f"block {i}: a residual needs in == out channels and no pool, "
                    f"got {in_channels} -> {block.out_channels}, pool={block.pool}")
            in_channels = block.out_channels
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems) + ". Change those fields.")

    def block_in_channels(self) -> list[int]:
        return [self.stem_channels] + [b.out_channels for b in self.blocks[:-1]]

    def expert_hidden(self, in_channels: int) -> int:
        """Width of the expert branch's first FC: max(C // r, 4), as the spec says."""
        return max(in_channels // self.reduction, 4)


@dataclass(frozen=True)
class AugmentConfig:
    """The seed's four augmentations; a zero turns one off."""

    flip: bool = True
    crop_padding: int = 4
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    rotation_degrees: float = 15.0

    def __post_init__(self):
        # A strength over 1 draws negative colour factors, which invert colours; a negative padding
        # is refused by numpy's draws but not by JAX's, so the two frameworks would part ways.
        problems = [f"{name} must be in [0, 1], got {getattr(self, name)}" for name in
                    ("brightness", "contrast", "saturation") if not 0 <= getattr(self, name) <= 1]
        if self.crop_padding < 0:
            problems.append(f"crop_padding must be >= 0 pixels, got {self.crop_padding}")
        if self.rotation_degrees < 0:
            problems.append(f"rotation_degrees must be >= 0, got {self.rotation_degrees}")
        if problems:
            raise ValueError("invalid AugmentConfig: " + "; ".join(problems) + ". Change those fields.")


# "adam_l2": PyTorch's Adam(weight_decay=w), w * p added to the gradient; "adamw": decoupled decay;
# "sgd_nesterov": PyTorch's SGD(momentum, nesterov=True, weight_decay=w), w * p added to the gradient.
OPTIMIZERS = ("adam_l2", "adamw", "sgd_nesterov")
# "step": StepLR; "onecycle": linear warm-up then linear decay (expert_core.schedules).
LR_SCHEDULES = ("step", "onecycle")
# "random": the stem conv as every other conv is initialised; "whitening": from the training images'
# patch covariance (expert_core.whitening), the same numbers in both frameworks.
STEM_INITS = ("random", "whitening")
# "random": each expert kernel as nn.Conv's; "dirac": then, in every expert of every block, the first
# min(in, out) output filters set to the identity (expert_core.dirac), so each block starts by passing
# its input on, whatever the attention (airbench's "dirac" initialisation).
EXPERT_KERNEL_INITS = ("random", "dirac")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. Defaults are the seed's: L2-coupled Adam, StepLR, label smoothing."""

    epochs: int = 240
    batch_size: int = 128
    optimizer: str = "adam_l2"  # one of OPTIMIZERS
    learning_rate: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    momentum: float = 0.9  # sgd_nesterov only
    weight_decay: float = 5e-4
    lr_schedule: str = "step"  # one of LR_SCHEDULES
    step_size_epochs: int = 30
    step_gamma: float = 0.5
    warmup_fraction: float = 0.2  # onecycle only
    label_smoothing: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stem_init: str = "random"  # one of STEM_INITS
    expert_kernel_init: str = "random"  # one of EXPERT_KERNEL_INITS
    # BatchNorm biases train at this multiple of the learning rate with their weight decay divided by
    # it, so that their decay per step stays the other parameters' (airbench's "scalebias": 64).
    norm_bias_lr_scale: float = 1.0
    # > 0: lookahead (airbench's, from hlb-cifar10): every this many optimiser steps, and at the last,
    # a moving average of the weights (BatchNorm statistics included) takes in the current ones and
    # training goes on from the average (expert_core.schedules.lookahead_decay).
    lookahead_period: int = 0
    lookahead_decay: float = 0.95  # per optimiser step; see schedules.lookahead_decay
    temperature_start: float = 0.0  # > 0: anneal linearly from here to the model's temperature
    temperature_anneal_epochs: int = 0
    test_time_flip: bool = False
    # > 0: the final evaluation adds views shifted by +-N pixels (data.augment.evaluation_views); the
    # epochs' evaluations skip them, as they triple its cost.
    test_time_translate: int = 0

    def __post_init__(self):
        choices = {"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES, "stem_init": STEM_INITS,
                   "expert_kernel_init": EXPERT_KERNEL_INITS}
        problems = [f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                    for name, allowed in choices.items() if getattr(self, name) not in allowed]
        if self.lookahead_period < 0 or not 0 <= self.lookahead_decay < 1:
            problems.append(f"lookahead_period must be >= 0 and lookahead_decay in [0, 1), got "
                            f"{self.lookahead_period} and {self.lookahead_decay}")
        if not self.norm_bias_lr_scale > 0:
            problems.append(f"norm_bias_lr_scale must be > 0, got {self.norm_bias_lr_scale}")
        if self.test_time_translate < 0:
            problems.append(f"test_time_translate must be >= 0 pixels, got {self.test_time_translate}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems) + ". Change those fields (the "
                             "training scripts' flags of the same names set the ones they offer).")


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    train: TrainConfig
    description: str
    # The epochs' test-set evaluations run after every this many epochs and after the last. A matter of
    # time, not of the recipe: on a 2-core CPU each costs about a tenth of an epoch of training.
    eval_every_epochs: int = 1


PRESETS: dict[str, Preset] = {
    "seed": Preset(
        "seed",
        ModelConfig(),
        TrainConfig(),
        "The seed's network and recipe: stem 32, three K=4 expert blocks 32/64/128 with pooling, "
        "Adam lr 1e-3 + L2 5e-4, StepLR(30 epochs, 0.5), label smoothing 0.1, "
        "flip / pad-4 crop / colour jitter 0.2 / rotation 15 deg, batch 128, 240 epochs.",
    ),
    "fast": Preset(
        "fast",
        ModelConfig(stem_channels=32, blocks=(
            BlockConfig(64), BlockConfig(64, pool=False, residual=True),
            BlockConfig(256), BlockConfig(256, pool=False, residual=True),
            BlockConfig(256), BlockConfig(256, pool=False, residual=True))),
        TrainConfig(epochs=22, batch_size=128, optimizer="adamw", learning_rate=2e-3, weight_decay=0.05,
                    lr_schedule="onecycle", warmup_fraction=0.2, label_smoothing=0.2,
                    augment=AugmentConfig(crop_padding=2, brightness=0.0, contrast=0.0, saturation=0.0,
                                          rotation_degrees=0.0),
                    stem_init="whitening", test_time_flip=True, test_time_translate=1),
        "Sized for two hours on a 2-core AMD EPYC with AVX-512: stem 32, six K=4 expert blocks at airbench's widths, "
        "64 / 64 (residual) / 256 / 256 (residual) / 256 / 256 (residual), pooling after each width change; "
        "AdamW 2e-3 (decoupled decay 0.05) with a one-cycle schedule, label smoothing 0.2, flip + pad-2 crop only, "
        "a whitening stem, "
        "test-time flip (and, for the final evaluation, 1-pixel translations), batch 128, 22 epochs; "
        "the test set is evaluated every 5 epochs and after the last, to spend the time on training.",
        eval_every_epochs=5,
    ),
    "tiny": Preset(
        "tiny",
        ModelConfig(stem_channels=8, blocks=(BlockConfig(8), BlockConfig(16)), num_experts=2),
        TrainConfig(epochs=1, batch_size=32, step_size_epochs=1),
        "A few thousand parameters, for tests and smoke runs.",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def to_dict(config) -> dict:
    """A JSON-ready dict of any config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["blocks"] = tuple(BlockConfig(**b) for b in d["blocks"])
    return ModelConfig(**d)


def train_config_from_dict(d: dict) -> TrainConfig:
    d = dict(d)
    d["augment"] = AugmentConfig(**d["augment"])
    d["adam_betas"] = tuple(d["adam_betas"])
    return TrainConfig(**d)


def with_overrides(train: TrainConfig, **overrides) -> TrainConfig:
    """The recipe with the given fields replaced; None values keep the preset's choice."""
    return dataclasses.replace(train, **{k: v for k, v in overrides.items() if v is not None})

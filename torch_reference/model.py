"""The canonical expert-block CNN in PyTorch, exactly as ../shared/spec/ARCHITECTURE.md defines it.

State-dict names are the project's canonical weight names (expert_core.portable): the K expert
kernels of a block live in one parameter `blocks.{i}.kernels` of shape (K, C', C, k, k), so the
three merge computations share the very same weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expert_core.config import CIFAR10_MEAN, CIFAR10_STD, MERGE_MODES, BlockConfig, ModelConfig

# Measured on a 2-core AMD EPYC (see README, "Merge computations"): the per-sample aggregated kernel
# as one grouped conv does 1x the conv FLOPs and wins for training.
DEFAULT_MERGE = "aggregated"

_MEAN = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)


def to_model_input(images) -> torch.Tensor:
    """uint8 NHWC images -> normalised float32 NCHW, as ((x / 255) - mean) / std."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
    return (x / 255 - _MEAN) / _STD


def check_merge(merge: str) -> str:
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}; pick one of those.")
    return merge


class Stem(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        k = config.kernel_size
        self.conv = nn.Conv2d(3, config.stem_channels, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(config.stem_channels, eps=config.bn_eps, momentum=config.bn_momentum)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ExpertBranch(nn.Module):
    """GAP -> FC(C -> max(C // r, 4)) -> ReLU -> FC(-> K) -> softmax(z / T)."""

    def __init__(self, in_channels: int, config: ModelConfig):
        super().__init__()
        hidden = config.expert_hidden(in_channels)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, config.num_experts)

    def forward(self, x, temperature: float):
        z = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))
        return F.softmax(z / temperature, dim=1)


def merge_branches(x, kernels, attention, padding):
    return sum(attention[:, k, None, None, None] * F.conv2d(x, kernels[k], padding=padding)
               for k in range(kernels.shape[0]))


def merge_stacked(x, kernels, attention, padding):
    experts, out_channels = kernels.shape[:2]
    y = F.conv2d(x, kernels.flatten(0, 1), padding=padding)
    y = y.view(x.shape[0], experts, out_channels, *y.shape[2:])
    return torch.einsum("nk,nkchw->nchw", attention, y)


def merge_aggregated(x, kernels, attention, padding):
    # One kernel per sample, W_n = sum_k a_nk W_k, applied as a grouped conv with one group per sample.
    n, c = x.shape[:2]
    per_sample = torch.einsum("nk,koihw->noihw", attention, kernels)
    y = F.conv2d(x.reshape(1, n * c, *x.shape[2:]), per_sample.flatten(0, 1), padding=padding, groups=n)
    return y.view(n, kernels.shape[1], *y.shape[2:])


MERGES = {"branches": merge_branches, "stacked": merge_stacked, "aggregated": merge_aggregated}


class ExpertBlock(nn.Module):
    def __init__(self, in_channels: int, block: BlockConfig, config: ModelConfig, merge: str):
        super().__init__()
        k = config.kernel_size
        self.block = block
        self.merge = merge
        self.padding = k // 2
        self.expert = ExpertBranch(in_channels, config)
        self.kernels = nn.Parameter(torch.empty(config.num_experts, block.out_channels, in_channels, k, k))
        self.bn = nn.BatchNorm2d(block.out_channels, eps=config.bn_eps, momentum=config.bn_momentum)
        for kernel in self.kernels.data:  # each expert initialised like a conv of its own
            nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")

    def forward(self, x, temperature: float):
        attention = self.expert(x, temperature)
        y = self.bn(MERGES[self.merge](x, self.kernels, attention, self.padding))
        if self.block.residual:
            y = y + x
        y = F.relu(y)
        if self.block.pool:
            y = F.max_pool2d(y, 2, 2)
        return y, attention


class Classifier(nn.Module):
    """GAP -> [Dense -> ReLU -> Dropout] -> Dense(num_classes)."""

    def __init__(self, in_features: int, config: ModelConfig):
        super().__init__()
        features = in_features
        if config.classifier_hidden:
            self.hidden = nn.Linear(in_features, config.classifier_hidden)
            self.dropout = nn.Dropout(config.dropout)
            features = config.classifier_hidden
        self.out = nn.Linear(features, config.num_classes)

    def forward(self, x):
        x = x.mean(dim=(2, 3))
        if hasattr(self, "hidden"):
            x = self.dropout(F.relu(self.hidden(x)))
        return self.out(x)


class ExpertCNN(nn.Module):
    def __init__(self, config: ModelConfig, merge: str = DEFAULT_MERGE):
        super().__init__()
        self.config = config
        self.stem = Stem(config)
        self.blocks = nn.ModuleList(
            ExpertBlock(c_in, block, config, check_merge(merge))
            for c_in, block in zip(config.block_in_channels(), config.blocks))
        self.classifier = Classifier(config.blocks[-1].out_channels, config)

    def set_merge(self, merge: str) -> None:
        for block in self.blocks:
            block.merge = check_merge(merge)

    def forward(self, x, temperature: float | None = None, return_attention: bool = False):
        temperature = self.config.temperature if temperature is None else temperature
        x = self.stem(x)
        attention = []
        for block in self.blocks:
            x, a = block(x, temperature)
            attention.append(a)
        logits = self.classifier(x)
        return (logits, attention) if return_attention else logits

"""The canonical expert-block CNN in PyTorch, exactly as ../shared/spec/ARCHITECTURE.md defines it.

State-dict names are the project's canonical weight names (expert_core.portable): the K expert
kernels of a block live in one parameter `blocks.{i}.kernels` of shape (K, C', C, k, k), so the
three merge computations share the very same weights and switching `merge` never touches them.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expert_core.config import (DEFAULT_MERGE, BlockConfig, ModelConfig, block_merge, check_merge, check_raw_images,
                                cpu_chunk_images, normalisation_table)
from expert_core.portable import check_canonical

_NORMALISED = torch.from_numpy(normalisation_table())


def to_model_input(images) -> torch.Tensor:
    """uint8 NHWC images (numpy or tensor) -> float32 NCHW, ((x / 255) - mean) / std looked up per value."""
    # A copy: batches may come from read-only memory maps or mirrored views, which torch cannot wrap.
    x = images if isinstance(images, torch.Tensor) else torch.tensor(np.ascontiguousarray(images))
    check_raw_images(x.dtype, x.shape)
    x = _NORMALISED.to(x.device)[x.long(), torch.arange(3, device=x.device)]
    return x.permute(0, 3, 1, 2).contiguous()  # contiguous NCHW, not a channels-last view


def torch_to_canonical(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, np.ndarray]:
    """The state dict as canonical numpy arrays, copied: on the CPU .numpy() shares the tensors'
    memory, which the next optimiser step or load_state_dict would overwrite in place."""
    tensors = {key: value.detach().cpu().numpy().copy() for key, value in state_dict.items()}
    check_canonical(tensors, config, "PyTorch -> canonical")
    return tensors


def canonical_to_torch(tensors: dict[str, np.ndarray], config: ModelConfig,
                       partial: bool = False) -> dict[str, torch.Tensor]:
    """Canonical arrays as a state dict (copies, so the arrays stay the caller's); `partial`: some of it."""
    check_canonical(tensors, config, "canonical -> PyTorch", partial)
    return {key: torch.from_numpy(np.array(value)) for key, value in tensors.items()}


def in_dtype(compute, dtype: torch.dtype | None, *operands) -> torch.Tensor:
    """Run `compute` on the operands cast to `dtype` (None: as they are) and hand back at least float32
    (BatchNorm's input): bfloat16 convolutions feed a float32 BatchNorm, parity's float64 ones a float64 one."""
    y = compute(*(o if dtype is None else o.to(dtype) for o in operands))
    return y.to(torch.promote_types(y.dtype, torch.float32))


def merge_branches(x, kernels, attention, padding):
    return sum(attention[:, k, None, None, None] * F.conv2d(x, kernels[k], padding=padding)
               for k in range(kernels.shape[0]))


def merge_stacked(x, kernels, attention, padding):
    experts, out_channels = kernels.shape[:2]
    y = F.conv2d(x, kernels.flatten(0, 1), padding=padding)
    y = y.view(x.shape[0], experts, out_channels, *y.shape[2:])
    return torch.einsum("nk,nkchw->nchw", attention, y)


def merge_aggregated(x, kernels, attention, padding):
    # One grouped conv per chunk (cpu_chunk_images): the whole batch at once was up to 1.7x slower
    # (seed preset, block 2, forward + backward: 36.8 ms in one call, 21.4 ms in chunks of 16 images).
    per_image = kernels[0].numel() + x[0].numel() + kernels.shape[1] * x[0, 0].numel()
    size = cpu_chunk_images(per_image) if x.device.type == "cpu" else len(x)
    if size >= len(x):
        return _aggregated_conv(x, kernels, attention, padding)
    # As few chunks as the size allows, as even as they come (as Flax's batch_chunk): split by size,
    # 128 images in chunks of 21 would end in a chunk of 2, which runs slower an image.
    chunks = -(-len(x) // size)
    return torch.cat([_aggregated_conv(x_part, kernels, a_part, padding)
                      for x_part, a_part in zip(x.tensor_split(chunks), attention.tensor_split(chunks))])


def _aggregated_conv(x, kernels, attention, padding):
    # Samples become groups of one grouped conv, so each sample meets its own kernel in one call.
    n, c = x.shape[:2]
    per_sample = torch.einsum("nk,koihw->noihw", attention, kernels)
    y = F.conv2d(x.reshape(1, n * c, *x.shape[2:]), per_sample.flatten(0, 1), padding=padding, groups=n)
    return y.view(n, kernels.shape[1], *y.shape[2:])


MERGES = {"branches": merge_branches, "stacked": merge_stacked, "aggregated": merge_aggregated}


def merge_backend(device: torch.device) -> str:
    """The AGGREGATE_MAX_CHANNELS_PER_PIXEL entry "auto" follows on `device`: "torch-avx512" on a CPU
    whose ATen kernels use AVX-512 (where oneDNN's dense convolutions have a faster algorithm), else "torch"."""
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return "torch-avx512"
    return "torch"


class Stem(nn.Module):
    """Conv k x k (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        k = config.kernel_size
        self.conv = nn.Conv2d(3, config.stem_channels, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(config.stem_channels, eps=config.bn_eps, momentum=config.bn_momentum)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, compute_dtype: torch.dtype | None = None):
        conv = functools.partial(F.conv2d, padding=self.conv.padding)
        return F.relu(self.bn(in_dtype(conv, compute_dtype, x, self.conv.weight)))


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


class ExpertBlock(nn.Module):
    """Attention-weighted K expert convs -> BatchNorm -> [+ X] -> ReLU -> [max-pool]; returns (Y, a)."""

    def __init__(self, in_channels: int, block: BlockConfig, config: ModelConfig, merge: str = DEFAULT_MERGE):
        super().__init__()
        k = config.kernel_size
        self.block = block
        self.merge = check_merge(merge)
        self.padding = k // 2
        self.expert = ExpertBranch(in_channels, config)
        self.kernels = nn.Parameter(torch.empty(config.num_experts, block.out_channels, in_channels, k, k))
        self.bn = nn.BatchNorm2d(block.out_channels, eps=config.bn_eps, momentum=config.bn_momentum)
        for kernel in self.kernels.data:  # fan_out of one expert, as if each were a conv of its own
            nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")

    def forward(self, x, temperature: float, compute_dtype: torch.dtype | None = None):
        attention = self.expert(x, temperature)
        merge_name = block_merge(self.merge, *x.shape[2:], self.block.out_channels, merge_backend(x.device))
        merge = functools.partial(MERGES[merge_name], padding=self.padding)
        y = self.bn(in_dtype(merge, compute_dtype, x, self.kernels, attention))
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
        self.hidden = None
        if config.classifier_hidden:
            self.hidden = nn.Linear(in_features, config.classifier_hidden)
            self.dropout = nn.Dropout(config.dropout)
            in_features = config.classifier_hidden
        self.out = nn.Linear(in_features, config.num_classes)

    def forward(self, x):
        x = x.mean(dim=(2, 3))
        if self.hidden is not None:
            x = self.dropout(F.relu(self.hidden(x)))
        return self.out(x)


class ExpertCNN(nn.Module):
    """Stem -> expert blocks -> classifier. `merge` may be reassigned at any time; weights stay put.

    `compute_dtype` torch.bfloat16 runs the convolutions alone in bfloat16, as Flax's model does
    (expert_core.config.PRECISIONS); None computes them in the parameters' dtype.
    """

    def __init__(self, config: ModelConfig, merge: str = DEFAULT_MERGE, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.stem = Stem(config)
        self.blocks = nn.ModuleList(
            ExpertBlock(c_in, block, config, merge)
            for c_in, block in zip(config.block_in_channels(), config.blocks))
        self.classifier = Classifier(config.blocks[-1].out_channels, config)

    @property
    def merge(self) -> str:
        return self.blocks[0].merge

    @merge.setter
    def merge(self, merge: str) -> None:
        check_merge(merge)
        for block in self.blocks:
            block.merge = merge

    def forward(self, x, temperature: float | None = None, return_attention: bool = False):
        """Logits (N, classes), plus the per-block attention (N, K) list when return_attention."""
        temperature = self.config.temperature if temperature is None else temperature
        # The usual float32 batch meets a float64 model (parity's float64 checks, --precision float64) in float64.
        x = self.stem(x.to(self.stem.conv.weight.dtype), self.compute_dtype)
        attention = []
        for block in self.blocks:
            x, a = block(x, temperature, self.compute_dtype)
            attention.append(a)
        logits = self.classifier(x)
        return (logits, attention) if return_attention else logits

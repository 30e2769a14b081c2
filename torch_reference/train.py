"""PyTorch training: the seed recipe as a `Backend` for the shared driver in expert_core.training.

Adam with L2-coupled weight decay (torch.optim.Adam(weight_decay=w)), decoupled AdamW or Nesterov SGD
(torch.optim.SGD(momentum, nesterov=True, weight_decay=w)), as the recipe says; the learning rate per
optimiser step comes from expert_core.schedules through LambdaLR, so StepLR here is exactly the
staircase the Flax side computes.

Under `torchrun --nproc_per_node N` it trains data-parallel (torch_reference.distributed): every
process gets the same global batch from the driver, augments it as one process would and trains on
its contiguous 1/N of it; DDP averages the gradients, BatchNorm sees the global batch, and the
loss and accuracy returned are those of the global batch.
"""

from __future__ import annotations

import io

import array_api_compat.torch as torch_namespace
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.augment import AugmentParams, apply_augmentation, draw_augment_params, predict_over_views
from expert_core import portable, schedules
from expert_core.config import DEFAULT_MERGE, EVAL_BATCH, ModelConfig, TrainConfig, parameter_dtype
from expert_core.training import Predictions, TrainingError, augment_rng, check_batch_divides, check_driver_step
from torch_reference import distributed
from torch_reference.model import ExpertCNN, canonical_to_torch, to_model_input, torch_to_canonical


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {device}: expected a CUDA GPU, found none; use --device cpu.")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise TrainingError(f"--device {device}: expected cpu, cuda, cuda:N or auto ({error}); pass one of "
                            "those.") from error
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", local_rank)  # torchrun starts one process per GPU of the host
    return resolved


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """One group, or two when BatchNorm biases train at config.norm_bias_lr_scale x the learning rate
    (with weight decay / that scale, so that their decay per step stays the others')."""
    scale = config.norm_bias_lr_scale
    if scale == 1:
        return [{"params": list(model.parameters())}]
    # By canonical name, as the Flax side picks them: a multi-GPU run has swapped its BatchNorm2d
    # layers for SyncBatchNorm, which a type test would miss.
    norm_biases = set(portable.norm_bias_names(model.config))
    named = list(model.named_parameters())
    return [{"params": [p for name, p in named if name not in norm_biases]},
            {"params": [p for name, p in named if name in norm_biases],
             "lr": config.learning_rate * scale, "weight_decay": config.weight_decay / scale}]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, steps_per_epoch: int):
    groups = parameter_groups(model, config)
    if config.optimizer == "sgd_nesterov":
        optimizer = torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum,
                                    nesterov=True, weight_decay=config.weight_decay)
    else:
        adam_class = torch.optim.Adam if config.optimizer == "adam_l2" else torch.optim.AdamW
        optimizer = adam_class(groups, lr=config.learning_rate, betas=config.adam_betas,
                               eps=config.adam_eps, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(schedules.learning_rate(step, config, steps_per_epoch)) / config.learning_rate)
    return optimizer, scheduler


class Lookahead:
    """airbench's lookahead: at a sync (expert_core.schedules) a moving average of the model's float
    tensors, BatchNorm statistics included, takes in the current ones, and the model becomes it."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, steps_per_epoch: int):
        self.model, self.config, self.steps_per_epoch = model, config, steps_per_epoch
        self.restart()

    def restart(self) -> None:
        self.slow = {name: value.detach().clone() for name, value in self.model.state_dict().items()
                     if value.is_floating_point()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if not schedules.lookahead_sync(step, self.config, self.steps_per_epoch):
            return
        take_in = 1 - schedules.lookahead_decay(step, self.config, self.steps_per_epoch)
        for name, weight in self.model.state_dict().items():  # these share the model's storage
            if name in self.slow:
                self.slow[name].add_(weight - self.slow[name], alpha=take_in)
                weight.copy_(self.slow[name])


def augment_on_device(images: np.ndarray, params: AugmentParams, padding: int, device: torch.device) -> torch.Tensor:
    """data.augment's pixel maths in torch on `device`, so a GPU step does not wait for the host to
    augment in numpy (about half of the step on an H200). On the CPU it is numpy's result bit for bit."""
    def on_device(array):  # torch.tensor copies: batches may be views of read-only memory maps
        return torch.tensor(np.asarray(array), device=device)

    return apply_augmentation(on_device(images), AugmentParams(*map(on_device, params)), padding, torch_namespace)


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class TorchBackend:
    framework = "torch"

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, *, steps_per_epoch: int,
                 seed: int, merge: str | None = None, device: str = "auto", precision: str = "float32",
                 devices: int | None = None):
        self.world = distributed.world_from_env()
        _check_world(self.world, train_config.batch_size, devices)
        self.is_main_process = self.world.rank == 0
        self.torch_device = resolve_device(device, self.world.local_rank)
        self.device = _describe(self.torch_device, self.world.size)
        self.config = train_config
        self.seed = seed
        torch.manual_seed(seed)
        # bfloat16: the convolutions alone, from float32 parameters (expert_core.config.PRECISIONS).
        compute_dtype = torch.bfloat16 if precision == "bfloat16" else None
        self.model = ExpertCNN(model_config, merge or DEFAULT_MERGE, compute_dtype).to(
            self.torch_device, getattr(torch, parameter_dtype(precision)))
        self.trained = self.model  # what a training step calls: the model itself, or its DDP wrapper
        if self.world.size > 1:
            distributed.join_process_group(self.torch_device)
            self.trained = distributed.data_parallel(self.model, self.torch_device)
        self.optimizer, self.scheduler = make_optimizer(self.model, train_config, steps_per_epoch)
        self.lookahead = Lookahead(self.model, train_config, steps_per_epoch) if train_config.lookahead_period else None

    @classmethod
    def from_canonical(cls, tensors: dict[str, np.ndarray], model_config: ModelConfig,
                       train_config: TrainConfig | None = None, device: str = "cpu") -> "TorchBackend":
        """A backend holding canonical weights (from either framework's checkpoint), to evaluate them."""
        backend = cls(model_config, train_config or TrainConfig(), steps_per_epoch=1, seed=0, device=device)
        backend.model.load_state_dict(canonical_to_torch(tensors, model_config))  # all of them, not a few
        return backend

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "numpy": np.__version__}

    def train_step(self, images, labels, step, temperature):
        """A step on the global batch `images`: this process augments and trains on its part of it."""
        check_driver_step(self.scheduler.last_epoch, step)
        part = self.world.part(len(images))
        # The draws for the whole global batch, so each image is augmented as in a single-process run.
        drawn = draw_augment_params(augment_rng(self.seed, step), len(images), self.config.augment)
        augmented = augment_on_device(images[part], AugmentParams(*(p[part] for p in drawn)),
                                      self.config.augment.crop_padding, self.torch_device)
        # Dropout draws depend on the step and the process alone; each process draws its own masks.
        torch.manual_seed((self.seed * 1_000_003 + step) * self.world.size + self.world.rank)
        return self.step_on_batch(augmented, labels[part], temperature)

    def step_on_batch(self, images: np.ndarray | torch.Tensor, labels: np.ndarray, temperature: float):
        """One optimiser step on an already augmented uint8 batch, this process's part of the global one
        (parity feeds these directly). Returns the global batch's mean loss, its number correct and the
        gradient norm."""
        self.model.train()
        x = to_model_input(images).to(self.torch_device)
        y = torch.as_tensor(labels, dtype=torch.long, device=self.torch_device)
        logits = self.trained(x, temperature=temperature)
        loss = smoothed_cross_entropy(logits, y, self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the processes here
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.model.parameters()
                                                          if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        if self.lookahead:
            self.lookahead.after_step(self.scheduler.last_epoch - 1)  # the step just taken, 0-based
        metrics = torch.stack([loss.detach(), (logits.argmax(1) == y).sum().float()])
        if self.world.size > 1:  # equal shares: the global mean loss is the mean of the processes' means
            dist.all_reduce(metrics)
        return metrics[0].item() / self.world.size, int(metrics[1].item()), grad_norm.item()

    @torch.no_grad()
    def predict(self, images: np.ndarray, temperature: float, translate: int = 0) -> Predictions:
        """Every process evaluates all `images` on its own model copy: no collectives, cheap next to training."""
        self.model.eval()

        def forward(view):
            return self.model(to_model_input(view).to(self.torch_device), temperature=temperature,
                              return_attention=True)

        batches = []
        for start in range(0, len(images), EVAL_BATCH):
            logits, attention = predict_over_views(forward, images[start:start + EVAL_BATCH], translate,
                                                   self.config.test_time_flip, np)
            batches.append((logits.float().cpu().numpy(), [a.float().cpu().numpy() for a in attention]))
        return Predictions.from_batches(batches)

    def state_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "lookahead": self.lookahead.slow if self.lookahead else None}, buffer)
        return buffer.getvalue()

    def canonical_weights(self) -> dict[str, np.ndarray]:
        return torch_to_canonical(self.model.state_dict(), self.model.config)

    def replace_weights(self, tensors: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict({**self.model.state_dict(),
                                    **canonical_to_torch(tensors, self.model.config, partial=True)})
        if self.lookahead:  # the average starts again from the new weights
            self.lookahead.restart()

    def load_state_bytes(self, payload: bytes) -> None:
        state = torch.load(io.BytesIO(payload), map_location=self.torch_device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.lookahead:
            self.lookahead.slow = state["lookahead"]


def _check_world(world: distributed.World, batch_size: int, devices: int | None) -> None:
    if devices is not None and devices != world.size:
        raise TrainingError(f"--devices {devices}: PyTorch trains on one device per process and this run has "
                            f"{world.size}; start it with torchrun --nproc_per_node {devices} and leave "
                            "--devices out.")
    check_batch_divides(batch_size, world.size, "processes")


def _describe(device: torch.device, processes: int) -> str:
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    return name if processes == 1 else f"{processes} x {name} (DDP)"

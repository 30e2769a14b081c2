"""PyTorch training: the seed recipe as a `Backend` for the shared driver in expert_core.training.

Adam with L2-coupled weight decay (torch.optim.Adam(weight_decay=w)), or decoupled AdamW when the
recipe says so; the learning rate per optimiser step comes from expert_core.schedules through
LambdaLR, so StepLR here is exactly the staircase the Flax side computes.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from data.augment import augment_batch
from expert_core import schedules
from expert_core.config import ModelConfig, TrainConfig
from expert_core.training import Predictions, augment_rng
from torch_reference.model import DEFAULT_MERGE, ExpertCNN, to_model_input

EVAL_BATCH = 500


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: expected a CUDA GPU, found none; use --device cpu.")
    return torch.device(device)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, steps_per_epoch: int):
    kind = torch.optim.Adam if config.optimizer == "adam_l2" else torch.optim.AdamW
    optimizer = kind(model.parameters(), lr=config.learning_rate, betas=config.adam_betas,
                     eps=config.adam_eps, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(schedules.learning_rate(step, config, steps_per_epoch)) / config.learning_rate)
    return optimizer, scheduler


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class TorchBackend:
    framework = "torch"

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, *, steps_per_epoch: int,
                 seed: int, merge: str | None = None, device: str = "auto", precision: str = "float32"):
        self.torch_device = resolve_device(device)
        # autocast keeps BatchNorm, softmax and the loss in float32 and the parameters stay float32.
        self.autocast = torch.autocast(self.torch_device.type, torch.bfloat16, enabled=precision == "bfloat16")
        self.device = _describe(self.torch_device)
        self.config = train_config
        self.seed = seed
        torch.manual_seed(seed)
        self.model = ExpertCNN(model_config, merge or DEFAULT_MERGE).to(self.torch_device)
        self.optimizer, self.scheduler = make_optimizer(self.model, train_config, steps_per_epoch)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "numpy": np.__version__}

    def train_step(self, images, labels, step, temperature):
        augmented = augment_batch(images, augment_rng(self.seed, step), self.config.augment)
        torch.manual_seed(self.seed * 1_000_003 + step)  # dropout draws depend on the step alone
        return self.step_on_batch(augmented, labels, temperature)

    def step_on_batch(self, images: np.ndarray, labels: np.ndarray, temperature: float):
        """One optimiser step on an already augmented uint8 batch (parity feeds these directly)."""
        self.model.train()
        x = to_model_input(images).to(self.torch_device)
        y = torch.as_tensor(labels, dtype=torch.long, device=self.torch_device)
        with self.autocast:
            logits = self.model(x, temperature=temperature)
        loss = smoothed_cross_entropy(logits.float(), y, self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item(), (logits.argmax(1) == y).sum().item()

    @torch.no_grad()
    def predict(self, images: np.ndarray, temperature: float) -> Predictions:
        self.model.eval()
        logits, attention = [], []
        for start in range(0, len(images), EVAL_BATCH):
            x = to_model_input(images[start:start + EVAL_BATCH]).to(self.torch_device)
            with self.autocast:
                batch_logits, batch_attention = self.model(x, temperature=temperature, return_attention=True)
                if self.config.test_time_flip:
                    batch_logits = (batch_logits + self.model(x.flip(3), temperature=temperature)) / 2
            logits.append(batch_logits.float().cpu().numpy())
            attention.append([a.float().cpu().numpy() for a in batch_attention])
        return Predictions(np.concatenate(logits), [np.concatenate(a) for a in zip(*attention)])

    def state_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, buffer)
        return buffer.getvalue()

    def canonical_weights(self) -> dict[str, np.ndarray]:
        return {key: value.detach().cpu().numpy() for key, value in self.model.state_dict().items()}

    def load_state_bytes(self, payload: bytes) -> None:
        state = torch.load(io.BytesIO(payload), map_location=self.torch_device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type

"""Train the canonical PyTorch expert-block CNN: `python scripts/train_torch.py --help`."""

import sys

from expert_core.training import main
from torch_reference.train import TorchBackend

if __name__ == "__main__":
    sys.exit(main(TorchBackend, "torch"))

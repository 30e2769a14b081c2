"""Train the canonical PyTorch expert-block CNN: `python scripts/train_torch.py --help`."""

import sys

from expert_core.huge_pages import relaunch_with_huge_pages

if __name__ == "__main__":
    relaunch_with_huge_pages()  # before PyTorch is imported, which the relaunch would repeat

from expert_core.training import main  # noqa: E402
from torch_reference.train import TorchBackend  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(TorchBackend, "torch"))

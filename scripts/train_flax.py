"""Train the expert-block CNN with Flax: `python scripts/train_flax.py --help`."""

import sys

from expert_core.huge_pages import relaunch_with_huge_pages

if __name__ == "__main__":
    relaunch_with_huge_pages()  # before JAX is imported, which the relaunch would repeat

from expert_core.training import main  # noqa: E402
from flax_expert.train import FlaxBackend, initialize_multihost  # noqa: E402

if __name__ == "__main__":
    initialize_multihost()
    sys.exit(main(FlaxBackend, "flax"))

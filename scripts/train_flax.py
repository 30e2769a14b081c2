"""Train the expert-block CNN with Flax: `python scripts/train_flax.py --help`."""

import sys

from expert_core.training import main
from flax_expert.train import FlaxBackend, initialize_multihost

if __name__ == "__main__":
    initialize_multihost()
    sys.exit(main(FlaxBackend, "flax"))

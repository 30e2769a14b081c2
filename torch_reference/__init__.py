"""The canonical expert-block CNN in PyTorch and its training backend."""

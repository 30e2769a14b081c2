"""CIFAR-10 for both frameworks: sources, caching and the seed's augmentations."""

from data.augment import AugmentParams, apply_augmentation, augment_batch, draw_augment_params
from data.cifar10 import Cifar10, load_cifar10
from data.errors import DataError

__all__ = ["AugmentParams", "Cifar10", "DataError", "apply_augmentation", "augment_batch",
           "draw_augment_params", "load_cifar10"]

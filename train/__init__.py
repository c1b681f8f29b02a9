"""CIFAR-10 training with SWATS: models, data and the Flax NNX trainer."""

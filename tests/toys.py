"""The small labelled sets and the MLP that several test files train, written once."""

import numpy as np

from flaxlesson import models, training


def three_classes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows of 4 normal features; a row's class (0, 1 or 2) counts the thresholds on features 0 and 1 it passes."""
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)


def three_classes_of_five(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows of 5 normal features; the class counts two thresholds, on features 0 + 1 and on feature 2."""
    x = np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 0.5).astype(np.int32)


def mlp_state(seed: int = 0) -> training.TrainState:
    """The lesson's MLP for `three_classes`, its params drawn from `seed`."""
    return training.create_train_state(models.MLP(num_classes=3), np.zeros((1, 4), np.float32), seed=seed)

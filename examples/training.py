"""Shared pieces of the ``train_*.py`` scripts: seeding, data splits, the training loop and the
reference file every example ships. Needs torch and scikit-learn (training only; the tests
read the recorded reference files and need neither)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import reference_outputs

HERE = Path(__file__).resolve().parent
SEED = 0


def seed_everything(seed: int = SEED) -> None:
    """Seed every generator, and pin torch to one thread so reruns give identical weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def split(features: np.ndarray, labels: np.ndarray, seed: int = SEED):
    """A stratified 75/25 train/test split."""
    from sklearn.model_selection import train_test_split

    return train_test_split(features, labels, test_size=0.25, stratify=labels,
                            random_state=seed)


def standardisation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and (population) standard deviation of the training split."""
    return train.mean(axis=0), train.std(axis=0)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float,
          batch_size: int = 32, weight_decay: float = 0.0, seed: int = SEED) -> nn.Module:
    """Minibatch Adam on cross-entropy, in float32; returns the model in eval mode."""
    xs = torch.from_numpy(np.asarray(x, dtype=np.float32))
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=order)
        for start in range(0, len(xs), batch_size):
            idx = perm[start:start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(xs[idx]), ys[idx])
            loss.backward()
            optimiser.step()
        schedule.step()
    return model.eval()


def write_reference(name: str, model: nn.Module, inputs: np.ndarray,
                    labels: np.ndarray) -> float:
    """Record ``NAME_reference.npz``: the test inputs (in the model's dtype), their labels, the
    float64 eval-mode torch outputs and the test accuracy those outputs give. Returns it."""
    outputs = reference_outputs(model, inputs)
    labels = np.asarray(labels, dtype=np.int64)
    accuracy = float(np.mean(outputs.argmax(axis=1) == labels))
    np.savez_compressed(HERE / f"{name}_reference.npz", inputs=inputs, labels=labels,
                        outputs=outputs, accuracy=np.float64(accuracy))
    return accuracy

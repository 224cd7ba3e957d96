"""Train examples/breast_cancer_smooth_mlp (the tanh/softplus twin of breast_cancer_mlp): writes
breast_cancer_smooth_mlp.npz and breast_cancer_smooth_mlp_reference.npz.

    python examples/train_breast_cancer_smooth_mlp.py
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer

from models import BreastCancerSmoothMLP, save_npz
from training import HERE, seed_everything, split, standardisation, train, write_reference

NAME = "breast_cancer_smooth_mlp"


def main() -> None:
    seed_everything()
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = split(data.data.astype(np.float64), data.target)
    model = BreastCancerSmoothMLP()
    mean, std = standardisation(x_train)
    with torch.no_grad():
        model.scaler.mean.copy_(torch.from_numpy(mean))
        model.scaler.std.copy_(torch.from_numpy(std))
    train(model, x_train, y_train, epochs=100, lr=1e-3, weight_decay=1e-4)
    save_npz(model, HERE / f"{NAME}.npz")
    accuracy = write_reference(NAME, model, x_test.astype(np.float64), y_test)
    print(f"{NAME}: test accuracy {accuracy:.4f} ({len(y_test)} samples)")


if __name__ == "__main__":
    main()

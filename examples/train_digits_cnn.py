"""Train examples/digits_cnn: writes digits_cnn.npz and digits_cnn_reference.npz.

    python examples/train_digits_cnn.py
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from models import DigitsCNN, save_npz
from training import HERE, seed_everything, split, train, write_reference

NAME = "digits_cnn"


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits as float32 [N, 1, 8, 8] images scaled to [0, 1] (pixels are 0..16)."""
    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[:, None], data.target


def main() -> None:
    seed_everything()
    x_train, x_test, y_train, y_test = split(*digits_images())
    model = DigitsCNN()
    train(model, x_train, y_train, epochs=40, lr=3e-3, batch_size=32)
    save_npz(model, HERE / f"{NAME}.npz")
    accuracy = write_reference(NAME, model, x_test, y_test)
    print(f"{NAME}: test accuracy {accuracy:.4f} ({len(y_test)} samples)")


if __name__ == "__main__":
    main()

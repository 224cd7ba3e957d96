"""Train examples/digits_transformer: writes digits_transformer.safetensors and
digits_transformer_reference.npz.

    python examples/train_digits_transformer.py

A small vision transformer (models.DigitsTransformer) on the 8x8 digits cut into 16 patches of
2x2 pixels, trained in float32. The weights are its state_dict saved with safetensors in
float64 (an exact widening), and the model's input is declared float64, so that the shipped
file and its reference are the float64 model exactly. The reference file holds the float64 test inputs and the float64 eval-mode
model's outputs.
"""

from __future__ import annotations

import time

import numpy as np
from safetensors.torch import save_file

from models import DigitsTransformer
from train_digits_cnn import digits_images
from training import HERE, seed_everything, split, train, write_reference

NAME = "digits_transformer"


def main() -> None:
    seed_everything()
    x_train, x_test, y_train, y_test = split(*digits_images())
    model = DigitsTransformer()
    start = time.perf_counter()
    train(model, x_train, y_train, epochs=60, lr=2e-3, batch_size=32, weight_decay=1e-4)
    seconds = time.perf_counter() - start
    state = {key: value.detach().double().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(HERE / f"{NAME}.safetensors"))
    accuracy = write_reference(NAME, model, x_test.astype(np.float64), y_test)
    print(f"{NAME}: test accuracy {accuracy:.4f} ({len(y_test)} samples), "
          f"trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()

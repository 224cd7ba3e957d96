"""Train examples/digits_resnet: writes digits_resnet.safetensors and digits_resnet_reference.npz.

    python examples/train_digits_resnet.py

The weights are the torch state_dict saved as-is with safetensors (batchnorm running statistics
and num_batches_tracked included); the reference outputs are the eval-mode model, i.e. batchnorm
with its running statistics, the same inference batchnorm pbxc computes.
"""

from __future__ import annotations

from safetensors.torch import save_file

from models import DigitsResNet
from train_digits_cnn import digits_images
from training import HERE, seed_everything, split, train, write_reference

NAME = "digits_resnet"


def main() -> None:
    seed_everything()
    x_train, x_test, y_train, y_test = split(*digits_images())
    model = DigitsResNet()
    train(model, x_train, y_train, epochs=40, lr=3e-3, batch_size=32)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(HERE / f"{NAME}.safetensors"))
    accuracy = write_reference(NAME, model, x_test, y_test)
    print(f"{NAME}: test accuracy {accuracy:.4f} ({len(y_test)} samples)")


if __name__ == "__main__":
    main()

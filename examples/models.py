"""The PyTorch definitions of the example models: one definition, used by the training scripts
(``train_*.py``) and by ``tests/examples`` to rebuild each model live from its shipped weights.

Every module is named so that its ``state_dict`` keys are exactly the keys its ``.pbx`` file
references (``fc1.weight``, ``scaler.mean``, ``block.bn1.running_var``, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent

#: The user-defined activation of ``wine_swish_mlp.pbx``: swish(z, beta) = z * sigmoid(beta * z).
SWISH_BETA = 1.5


class Standardize(nn.Module):
    """(x - mean) / std with the training split's constants, stored as buffers ``mean`` and
    ``std``; the torch twin of pbxc's ``normalize(x, @scaler)``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Swish(nn.Module):
    """swish(z, beta) = z * sigmoid(beta * z), written out exactly as in the .pbx file."""

    def __init__(self, beta: float = SWISH_BETA) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.sigmoid(self.beta * z)


class BreastCancerMLP(nn.Module):
    """30 raw features -> standardise -> 64 relu -> 32 relu -> 2 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.scaler = Standardize(30)
        self.fc1 = nn.Linear(30, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.scaler(x)))
        h = torch.relu(self.fc2(h))
        return self.out(h)


class BreastCancerSmoothMLP(nn.Module):
    """The smooth twin of BreastCancerMLP: 30 raw features -> standardise -> 64 tanh ->
    32 softplus -> 2 logits (nonzero logit Hessians, for specs/hessian.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.scaler = Standardize(30)
        self.fc1 = nn.Linear(30, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(self.scaler(x)))
        h = nn.functional.softplus(self.fc2(h))
        return self.out(h)


class DigitsCNN(nn.Module):
    """[1, 8, 8] -> conv 8 -> relu -> maxpool 2 -> conv 16 -> relu -> avgpool 2 -> 64 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)        # [8, 4, 4]
        h = nn.functional.avg_pool2d(torch.relu(self.conv2(h)), 2)        # [16, 2, 2]
        return self.fc(torch.flatten(h, 1))


class ResidualBlock(nn.Module):
    """conv -> bn -> relu -> conv -> bn, plus the identity skip (the final relu is outside)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(h)) + x


class DigitsResNet(nn.Module):
    """[1, 8, 8] -> conv 16 -> bn -> relu -> residual block -> relu -> global avgpool -> 10."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.block = ResidualBlock(channels)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.block(h))
        return self.fc(h.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections and an output projection:
    softmax(q k^T * head_dim^-1/2) v per head, the heads concatenated, then ``out``. Written out
    step for step as ``digits_transformer.pbx`` writes it (no fused kernels)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:            # [B, T, D] -> [B, H, T, hd]
            return z.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        w = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)   # [B, H, T, T]
        return self.out((w @ v).transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """A pre-norm encoder block: x + attn(norm1(x)), then x + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """A small vision transformer: [1, 8, 8] -> 16 patches of 2x2 pixels -> linear embedding 32
    -> class token + learned positional embedding (17 tokens) -> 2 pre-norm blocks (4 heads of
    8, GELU MLP 64) -> layernorm of the class token -> 10 logits."""

    PATCH, DIM, HEADS, MLP, DEPTH = 2, 32, 4, 64, 2

    def __init__(self) -> None:
        super().__init__()
        n = (8 // self.PATCH) ** 2
        self.patch_embed = nn.Linear(self.PATCH * self.PATCH, self.DIM)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, self.DIM))
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(n + 1, self.DIM))
        self.blocks = nn.ModuleList(TransformerBlock(self.DIM, self.HEADS, self.MLP)
                                    for _ in range(self.DEPTH))
        self.norm = nn.LayerNorm(self.DIM)
        self.head = nn.Linear(self.DIM, 10)

    @classmethod
    def patches(cls, image: torch.Tensor) -> torch.Tensor:
        """[B, 1, 8, 8] -> [B, 16, 4]: 2x2 patches in row-major order, each read row-major
        (the .pbx file's reshape(4, 2, 4, 2) -> transpose(0, 2, 1, 3) -> reshape(16, 4))."""
        s, p = 8 // cls.PATCH, cls.PATCH
        return image.reshape(-1, s, p, s, p).permute(0, 1, 3, 2, 4).reshape(-1, s * s, p * p)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.patches(image))                         # [B, 16, 32]
        cls = self.cls_token.expand(tokens.shape[0], 1, self.DIM)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embedding               # [B, 17, 32]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


class WineSwishMLP(nn.Module):
    """13 raw features -> standardise -> 32 swish -> 16 swish -> 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.scaler = Standardize(13)
        self.fc1 = nn.Linear(13, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 3)
        self.act = Swish(SWISH_BETA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(self.scaler(x)))
        h = self.act(self.fc2(h))
        return self.out(h)


#: example name -> (model class, weights file name beside the .pbx)
EXAMPLES: dict[str, tuple[type[nn.Module], str]] = {
    "breast_cancer_mlp": (BreastCancerMLP, "breast_cancer_mlp.npz"),
    "breast_cancer_smooth_mlp": (BreastCancerSmoothMLP, "breast_cancer_smooth_mlp.npz"),
    "digits_cnn": (DigitsCNN, "digits_cnn.npz"),
    "digits_resnet": (DigitsResNet, "digits_resnet.safetensors"),
    "digits_transformer": (DigitsTransformer, "digits_transformer.safetensors"),
    "wine_swish_mlp": (WineSwishMLP, "wine_swish_mlp.npz"),
}


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Every array of a shipped .npz or .safetensors weight file, by key."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def load_model(name: str, directory: Path = HERE) -> nn.Module:
    """Rebuild an example from its shipped weights: strict key match, float64, eval mode."""
    cls, weights = EXAMPLES[name]
    model = cls()
    state = {key: torch.from_numpy(np.array(value)) for key, value in
             read_weights(directory / weights).items()}
    model.load_state_dict(state, strict=True)
    return model.double().eval()


def save_npz(model: nn.Module, path: Path) -> None:
    """The state_dict as an .npz of plain arrays, keys as PyTorch names them."""
    state = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
    np.savez_compressed(path, **state)


@torch.no_grad()
def reference_outputs(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """The eval-mode outputs of a float64 copy of ``model``; ``model`` itself is not changed."""
    import copy

    twin = copy.deepcopy(model).double().eval()
    return twin(torch.from_numpy(np.asarray(inputs, dtype=np.float64))).numpy()

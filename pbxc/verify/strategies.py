"""Hypothesis strategies for random well-formed models: .pbx text plus weights.

``random_models()`` draws a DAG of the supported ops (linear, conv2d, conv_transpose2d, max and
average pooling (ceil_mode too), adaptive pooling, upsampling, padding, batch norm, normalize,
residual adds, products and gates, constants, prelu, concat (with constant operands), flatten,
global pooling and activations, a user-defined one included) with random shapes and weights, ending in a
``logits`` vector. Used by the project's property tests on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

Array = np.ndarray

ACTIVATIONS = ("relu", "tanh", "softplus", "leaky_relu", "elu", "sigmoid", "silu", "swish",
               "abs", "hardtanh")
USER_ACTIVATIONS = "activation swish(z, beta = 1.0) = z * sigmoid(beta * z)\n"


@dataclass
class RandomModel:
    text: str
    weights: dict[str, Array]
    input_shape: tuple[int, ...]
    ops: list[str] = field(default_factory=list)

    def inputs(self, batch: int, rng: np.random.Generator) -> Array:
        return rng.uniform(-1.0, 1.0, size=(batch, *self.input_shape))


@st.composite
def random_models(draw: st.DrawFn, max_ops: int = 5) -> RandomModel:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    image = draw(st.booleans())
    if image:
        shape: tuple[int, ...] = (draw(st.integers(1, 2)), draw(st.integers(3, 6)),
                                  draw(st.integers(3, 6)))
    else:
        shape = (draw(st.integers(2, 6)),)
    lines = ["model random", 'weights "w.npz"',
             f"input x: float64[{', '.join(map(str, shape))}]", USER_ACTIVATIONS]
    weights: dict[str, Array] = {}
    values: dict[str, tuple[int, ...]] = {"x": shape}
    ops: list[str] = []
    counter = 0

    def fresh(prefix: str) -> str:
        nonlocal counter
        counter += 1
        return f"{prefix}{counter}"

    def weight(key: str, shape_: tuple[int, ...], fan_in: int) -> None:
        weights[key] = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), size=shape_)

    for _ in range(draw(st.integers(1, max_ops))):
        src = draw(st.sampled_from(sorted(values)))
        s = values[src]
        choices = ["activation", "activation", "activation", "add", "batchnorm"]
        choices += ["prelu", "product", "constant"]
        if len(s) == 3:
            choices += ["conv2d", "conv2d", "conv_transpose2d", "flatten", "global_avgpool",
                        "concat", "upsample", "adaptive", "pad", "gate"]
            if s[1] >= 2 and s[2] >= 2:
                choices += ["maxpool2d", "avgpool2d", "pool_ceil"]
        else:
            choices += ["linear", "linear", "concat", "normalize"]
        op = draw(st.sampled_from(choices))
        name = fresh("v")
        if op == "activation":
            act = draw(st.sampled_from(ACTIVATIONS))
            lines.append(f"{name} = {act}({src})")
            out = s
            op = act
        elif op == "add":
            same = sorted(v for v, sh in values.items() if sh == s)
            other = draw(st.sampled_from(same))
            lines.append(f"{name} = add({src}, {other})")
            out = s
        elif op == "batchnorm":
            c = s[0]
            weight(f"{name}.weight", (c,), 1)
            weights[f"{name}.bias"] = rng.normal(size=c) * 0.1
            weights[f"{name}.running_mean"] = rng.normal(size=c) * 0.1
            weights[f"{name}.running_var"] = rng.uniform(0.5, 2.0, size=c)
            lines.append(f"{name} = batchnorm({src}, @{name})")
            out = s
        elif op == "normalize":
            weights[f"{name}.mean"] = rng.normal(size=s) * 0.1
            weights[f"{name}.std"] = rng.uniform(0.5, 2.0, size=s)
            lines.append(f"{name} = normalize({src}, @{name})")
            out = s
        elif op == "linear":
            n_out = draw(st.integers(2, 6))
            weight(f"{name}.weight", (n_out, s[0]), s[0])
            bias = draw(st.booleans())
            if bias:
                weights[f"{name}.bias"] = rng.normal(size=n_out) * 0.1
            lines.append(f"{name} = linear({src}, @{name}{'' if bias else ', bias=false'})")
            out = (n_out,)
        elif op == "conv2d":
            c_out = draw(st.integers(1, 3))
            k = draw(st.integers(1, min(3, s[1], s[2])))
            pad = draw(st.integers(0, 1))
            weight(f"{name}.weight", (c_out, s[0], k, k), s[0] * k * k)
            weights[f"{name}.bias"] = rng.normal(size=c_out) * 0.1
            if draw(st.booleans()):
                lines.append(f"{name} = conv2d({src}, @{name}, padding={pad})")
                out = (c_out, s[1] + 2 * pad - k + 1, s[2] + 2 * pad - k + 1)
            else:   # per side: (top, bottom, left, right)
                top, left = draw(st.integers(0, 1)), draw(st.integers(0, 1))
                lines.append(f"{name} = conv2d({src}, @{name}, padding=({top}, {pad}, {left}, "
                             f"{pad}))")
                out = (c_out, s[1] + top + pad - k + 1, s[2] + left + pad - k + 1)
        elif op == "conv_transpose2d":
            c_out = draw(st.integers(1, 3))
            k = draw(st.integers(1, 3))
            stride = draw(st.integers(1, 2))
            pad = draw(st.integers(0, k - 1))
            extra = draw(st.integers(0, stride - 1))
            weight(f"{name}.weight", (s[0], c_out, k, k), s[0] * k * k)
            weights[f"{name}.bias"] = rng.normal(size=c_out) * 0.1
            lines.append(f"{name} = conv_transpose2d({src}, @{name}, stride={stride}, "
                         f"padding={pad}, output_padding={extra})")
            out = (c_out, *((n - 1) * stride - 2 * pad + k + extra for n in s[1:]))
        elif op in ("maxpool2d", "avgpool2d"):
            lines.append(f"{name} = {op}({src}, kernel=2)")
            out = (s[0], s[1] // 2, s[2] // 2)
        elif op == "prelu":
            weights[f"{name}.weight"] = rng.uniform(-0.5, 0.5, size=s[0])
            lines.append(f"{name} = prelu({src}, @{name})")
            out = s
        elif op == "product":   # a product of two values of one shape
            same = sorted(v for v, sh in values.items() if sh == s)
            other = draw(st.sampled_from(same))
            lines.append(f"{name} = mul({src}, tanh({other}))")
            out = s
        elif op == "constant":
            how = draw(st.sampled_from(["add", "sub", "mul", "div"]))
            c_shape = (s[0],) + (1,) * (len(s) - 1)
            weights[f"{name}"] = rng.uniform(0.5, 1.5, size=c_shape)
            lines.append(f"{name} = {how}({src}, @{name})")
            out = s
        elif op == "gate":   # squeeze-and-excitation: a [C, 1, 1] gate on [C, H, W]
            weight(f"{name}.weight", (s[0], s[0]), s[0])
            weights[f"{name}.bias"] = rng.normal(size=s[0]) * 0.1
            lines.append(f"{name} = mul({src}, sigmoid(unsqueeze(linear(global_avgpool({src}), "
                         f"@{name}), axes=(1, 2))))")
            out = s
        elif op == "upsample":
            mode = draw(st.sampled_from(['"nearest"', '"linear"']))
            corners = "true" if mode == '"linear"' and draw(st.booleans()) else "false"
            lines.append(f"{name} = upsample({src}, mode={mode}, scale=2, "
                         f"align_corners={corners})")
            out = (s[0], 2 * s[1], 2 * s[2])
        elif op == "adaptive":
            size = (draw(st.integers(1, s[1])), draw(st.integers(1, s[2])))
            lines.append(f"{name} = adaptive_avgpool2d({src}, {size})")
            out = (s[0], *size)
        elif op == "pad":
            lines.append(f"{name} = pad({src}, pads=(1, 0, 0, 1), value=0.25)")
            out = (s[0], s[1] + 1, s[2] + 1)
        elif op == "pool_ceil":
            kind = draw(st.sampled_from(["maxpool2d", "avgpool2d"]))
            lines.append(f"{name} = {kind}({src}, 2, stride=2, ceil_mode=true)")
            out = (s[0], -(-s[1] // 2), -(-s[2] // 2))
        elif op == "flatten":
            lines.append(f"{name} = flatten({src})")
            out = (int(np.prod(s)),)
        elif op == "global_avgpool":
            lines.append(f"{name} = global_avgpool({src})")
            out = (s[0],)
        else:  # concat along axis 0
            same = sorted(v for v, sh in values.items() if sh[1:] == s[1:] and len(sh) == len(s))
            other = draw(st.sampled_from(same))
            operands = [src, other]
            extra = 0
            token = draw(st.sampled_from(["", "before", "after"]))   # a constant operand
            if token:
                extra = draw(st.integers(1, 2))
                weights[f"{name}.token"] = rng.normal(size=(extra, *s[1:]))
                operands.insert(0 if token == "before" else 2, f'@"{name}.token"')
            lines.append(f"{name} = concat({', '.join(operands)})")
            out = (s[0] + values[other][0] + extra, *s[1:])
        ops.append(op)
        values[name] = out
    last = name
    s = values[last]
    if len(s) != 1:
        lines.append(f"flat = flatten({last})")
        last, s = "flat", (int(np.prod(s)),)
    classes = draw(st.integers(2, 4))
    weight("head.weight", (classes, s[0]), s[0])
    weights["head.bias"] = rng.normal(size=classes) * 0.1
    lines.append(f"output logits = linear({last}, @head)")
    return RandomModel("\n".join(lines) + "\n", weights, shape, ops)

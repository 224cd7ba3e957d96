"""Weight files: safe loading, and every bad-weight case named with key, file and .pbx line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.errors import WeightError
from pbxc.weights.store import load_weight_file

MLP = '''model m
weights "{file}"
input x: float64[3]
output y = linear(x, @fc)
'''
GOOD = {"fc.weight": np.arange(6.0).reshape(2, 3), "fc.bias": np.array([1.0, -1.0])}


def test_npz_and_safetensors_give_the_same_model(write_model: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    npz = write_model(MLP.format(file="w.npz"), GOOD, name="a.pbx")
    save_file({k: np.ascontiguousarray(v) for k, v in GOOD.items()}, str(tmp_path / "w.safetensors"))
    st = write_model(MLP.format(file="w.safetensors"), name="b.pbx")
    x = np.array([[1.0, 2.0, 3.0]])
    expected = x @ GOOD["fc.weight"].T + GOOD["fc.bias"]
    for path in (npz, st):
        np.testing.assert_array_equal(pbxc.load(path).forward(x), expected)


def test_missing_weight_file_names_path_and_line(write_model: Callable[..., Path]) -> None:
    path = write_model(MLP.format(file="nope.npz"))
    with pytest.raises(WeightError) as info:
        pbxc.load(path)
    d = info.value.diagnostics[0]
    assert "weight file not found" in d.message and "nope.npz" in d.message
    assert d.pos is not None and (d.pos.line, d.pos.column) == (2, 9)


def test_missing_weight_file_suggests_neighbours(write_model: Callable[..., Path]) -> None:
    path = write_model(MLP.format(file="weights.npz"), GOOD, weights_name="weight.npz")
    with pytest.raises(WeightError, match=r"nearby weight files: weight.npz"):
        pbxc.load(path)


def test_missing_key_lists_nearest(write_model: Callable[..., Path]) -> None:
    path = write_model(MLP.format(file="w.npz"),
                       {"fc1.weight": GOOD["fc.weight"], "fc1.bias": GOOD["fc.bias"]})
    with pytest.raises(pbxc.PbxError) as info:
        pbxc.load(path)
    diags = info.value.diagnostics
    assert len(diags) == 2
    assert "missing weight 'fc.weight' (weight of linear 'y')" in diags[0].message
    assert "nearest keys: fc1.weight" in diags[0].notes[0]
    assert diags[0].pos is not None and diags[0].pos.line == 4


def test_wrong_shape_names_key_and_both_shapes(write_model: Callable[..., Path]) -> None:
    path = write_model(MLP.format(file="w.npz"), {**GOOD, "fc.weight": np.ones((2, 4))})
    with pytest.raises(pbxc.PbxError, match=r"'fc.weight' has shape \[2, 4\].*expected \[2, 3\]"):
        pbxc.load(path)


def test_non_finite_weights_are_refused(write_model: Callable[..., Path]) -> None:
    bad = GOOD["fc.weight"].copy()
    bad[1, 2] = np.nan
    path = write_model(MLP.format(file="w.npz"), {**GOOD, "fc.weight": bad})
    with pytest.raises(pbxc.PbxError, match=r"'fc.weight' has 1 non-finite value\(s\), the first "
                                            r"nan at index \[1, 2\]"):
        pbxc.load(path)


def test_integer_weights_are_refused(write_model: Callable[..., Path]) -> None:
    path = write_model(MLP.format(file="w.npz"), {**GOOD, "fc.bias": np.array([1, 2])})
    with pytest.raises(pbxc.PbxError, match=r"'fc.bias' has dtype int64; expected a floating"):
        pbxc.load(path)


def test_pickled_object_in_npz_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # would create a file if unpickled

    obj = np.empty(1, dtype=object)
    obj[0] = Payload()
    np.savez(tmp_path / "evil.npz", **{"fc.weight": obj})
    with pytest.raises(WeightError, match=r"refused to load key 'fc.weight'.*pickled"):
        load_weight_file(tmp_path / "evil.npz")
    assert not marker.exists()


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(WeightError, match=r"cannot read weight file"):
        load_weight_file(tmp_path / "junk.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(WeightError, match=r"cannot read weight file"):
        load_weight_file(tmp_path / "junk.safetensors")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(WeightError, match=r"expected one of .npz, .safetensors"):
        load_weight_file(tmp_path / "w.pt")


def test_duplicate_key_across_files(write_model: Callable[..., Path], tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", **{"fc.bias": np.zeros(2)})
    path = write_model(MLP.replace('"{file}"', '"w.npz", "b.npz"'), GOOD)
    with pytest.raises(WeightError, match=r"'fc.bias' is in both"):
        pbxc.load(path)


# ------------------------------------------------------------------ run-time inputs

def test_input_shape_and_nan_errors(write_model: Callable[..., Path]) -> None:
    model = pbxc.load(write_model(MLP.format(file="w.npz"), GOOD))
    with pytest.raises(pbxc.InputError, match=r"input 'x' .* has shape \[2, 4\]; expected "
                                              r"\[batch, 3\]"):
        model.forward(np.ones((2, 4)))
    with pytest.raises(pbxc.InputError, match=r"add a batch axis"):
        model.forward(np.ones(3))
    x = np.ones((2, 3))
    x[1, 0] = np.inf
    with pytest.raises(pbxc.InputError, match=r"1 non-finite value\(s\): inf at index \[1, 0\]"):
        model.forward(x)
    with pytest.raises(pbxc.InputError, match=r"expected real numbers"):
        model.forward(np.ones((2, 3), dtype=complex))
    with pytest.raises(pbxc.InputError, match=r"missing"):
        model.forward({"u": np.ones((2, 3))})


def test_dtype_selection(write_model: Callable[..., Path]) -> None:
    path = write_model(MLP.format(file="w.npz"), GOOD)
    assert pbxc.load(path).dtype == np.float64
    m32 = pbxc.load(path, dtype="float32")
    assert m32.forward(np.ones((1, 3))).dtype == np.float32
    with pytest.raises(pbxc.InputError, match=r"float32 or float64"):
        pbxc.load(path, dtype="int8")

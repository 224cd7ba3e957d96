"""Generated code: outside text never runs, and no two graph names share a variable.

Hostile strings (quotes, triple quotes, backslashes, raw newlines and carriage returns, NUL,
``*/``, ``??/`` trigraphs, form feed, U+2028, a Python and a C payload, 100k characters) go
through every field that reaches generated code: the .pbx file's folder and name, the source
lines quoted in comments, feature and class names, a weight key and the weights file name.
The NumPy module is imported and run, the CUDA source is built with the g++ serial-grid shim
(its constructors run on loading) and compiled with NVRTC; no canary file may appear, and
the results must equal the runtime's. specs/security.md lists what each test holds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pbxc
from pbxc.cli import main
from pbxc.codegen.escape import c_text, identifier, py_literal, py_text
from pbxc.codegen.numpy_module import var

CANARY = "CANARY"
PY_PAYLOAD = f'__import__("os").system("touch {CANARY}")'
C_PAYLOAD = (f'extern "C" int system(const char*); __attribute__((constructor)) static void '
             f'pbx_pwn(void) {{ system("touch {CANARY}"); }}')
#: every hostile piece, none holding "/" (they also go into file names)
PIECES = ['"""', "'''", '"', "'", "\\", "\\x", "\\N", "*/", "/*"[1:], "??/", "??=", "\f",
          "\u2028", "\u2029", "\x85", "\r", "\t", "\u202e"]
HOSTILE = "".join(PIECES)
#: inside a .pbx file: a raw carriage return would be read as a line break (universal newlines)
IN_FILE = HOSTILE.replace("\r", "")
NAME_PAYLOAD = (f'v""";{PY_PAYLOAD};"""w\n{PY_PAYLOAD}\n{C_PAYLOAD.replace("/", "")}\n'
                f"{HOSTILE}\\")


def hostile_model(root: Path) -> Path:
    """A small MLP whose every outside string is hostile; its folder and file name too."""
    folder = root / ("d" + NAME_PAYLOAD[:120].replace("/", ""))
    folder.mkdir()
    weights_name = 'w"\n*??=\\.npz'   # no "/": a file name
    key = 'k"\'\\\n"""'
    rng = np.random.default_rng(0)
    np.savez(folder / weights_name, **{
        "fc0.weight": rng.standard_normal((3, 3)), "fc0.bias": rng.standard_normal(3),
        "fc1.weight": rng.standard_normal((4, 3)), "fc1.bias": rng.standard_normal(4),
        f"{key}.weight": rng.standard_normal((2, 4)), f"{key}.bias": rng.standard_normal(2)})

    def s(text: str) -> str:   # a .pbx STRING: \n, \" and \\ are its escapes
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    long = "L" * 100_000
    features = [s(NAME_PAYLOAD.replace("\r", "")), s("\x00" + IN_FILE), s(long)]
    classes = [s(f'"""\n{PY_PAYLOAD}\n"""'), s("*/\n" + C_PAYLOAD + "\n/*" + long)]
    comment = (f"# {IN_FILE}\u2028{PY_PAYLOAD}\f{C_PAYLOAD}\x85 */ ??/ \\ \x00 " + long + " \\")
    text = "\n".join([
        "model m",
        f"weights {s(weights_name)}",
        f"input x: float64[3] features [{', '.join(features)}]",
        # h__linear beside h's nested h/linear: the names that once shared a variable
        f"h__linear = linear(x, @fc0)   {comment}",
        f"h = relu(linear(h__linear, @fc1))   {comment}",
        f"output y = linear(h, @{s(key)}) classes [{', '.join(classes)}]   {comment}",
        ""])
    path = folder / (NAME_PAYLOAD[:150].replace("/", "") + ".pbx")
    path.write_text(text, encoding="utf-8")
    return path


def import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_payload_line(text: str) -> None:
    """No generated line starts with a payload (it would be code, not comment or string)."""
    for line in text.split("\n"):
        bare = line.strip()
        assert not bare.startswith(("__import__", "extern \"C\" int system")), line[:120]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)   # a payload's "touch CANARY" would land here
    return tmp_path


def test_hostile_strings_in_every_field_compile_to_inert_numpy(in_tmp: Path) -> None:
    path = hostile_model(in_tmp)
    model = pbxc.load(path)
    out = in_tmp / "out"
    assert main(["compile", str(path), "-o", str(out)]) == 0
    source = (out / "m.py").read_text(encoding="utf-8")
    no_payload_line(source)
    module = import_file(out / "m.py", "secout_hostile_numpy")
    x = np.random.default_rng(1).standard_normal((5, 3))
    np.testing.assert_allclose(module.forward(x)["y"], model.forward(x), rtol=1e-13)
    np.testing.assert_allclose(module.gradient(x), model.gradient(x), rtol=1e-12, atol=1e-15)
    relevance, _ = module.lrp(x)
    assert relevance.shape == x.shape
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["outputs"]["y"]["classes"] == list(model.class_names["y"])
    assert not (in_tmp / CANARY).exists()


def test_hostile_strings_in_every_field_compile_to_inert_cuda(in_tmp: Path) -> None:
    if shutil.which("g++") is None:
        pytest.skip("the CUDA CPU shim needs g++")
    from pbxc.codegen.cuda_shim import ShimDevice, build_shim, load_nvrtc, nvrtc_compile

    path = hostile_model(in_tmp)
    model = pbxc.load(path)
    out = in_tmp / "cuda"
    assert main(["compile", str(path), "-o", str(out), "--target", "cuda"]) == 0
    cu = (out / "m.cu").read_text(encoding="utf-8")
    no_payload_line(cu)
    no_payload_line((out / "m.py").read_text(encoding="utf-8"))
    assert "\r" not in cu and "\x00" not in cu and "\u2028" not in cu
    for line in cu.split("\n"):   # no comment that splices, ends early or holds a trigraph
        if "//" in line:
            comment = line[line.index("//"):]
            assert not comment.endswith("\\") and "??" not in comment, line[:120]
            assert "*/" not in comment and comment.isascii(), line[:120]
    module = import_file(out / "m.py", "secout_hostile_cuda")
    module.set_weights({k: np.asarray(v) for k, v in model.weights.items()})
    module.set_device(ShimDevice(build_shim(cu, module.KERNELS, in_tmp / "shim"),
                                 module.KERNELS))   # loading the .so runs its constructors
    x = np.random.default_rng(2).standard_normal((4, 3))
    np.testing.assert_allclose(np.asarray(module.forward(x)["y"]), model.forward(x),
                               rtol=1e-12, atol=1e-14)
    if load_nvrtc() is not None:
        assert nvrtc_compile(cu, "sm_80").image
    assert not (in_tmp / CANARY).exists()


# ---------------------------------------------------------------- the escapers themselves

HOSTILE_TEXT = st.lists(st.sampled_from([*PIECES, "a", "/", "\x00", "\n", "\udcff", "é", "*",
                                         "?", " "]), max_size=40).map("".join)


@given(HOSTILE_TEXT)
def test_escaped_text_is_inert_in_python_and_c(text: str) -> None:
    # a comment and a docstring holding the text compile, and mean only the text
    doc = f'def f():\n    """{py_text(text, 10_000)}"""\n    return 1  # {py_text(text)}\n'
    namespace: dict[str, object] = {}
    exec(compile(doc, "<escaped>", "exec"), namespace)
    assert namespace["f"].__doc__ == text.encode("utf-8", "surrogatepass").decode(
        "utf-8", "surrogatepass")
    assert eval(py_literal(text)) == text
    c = c_text(text)
    assert c.isascii() and c.isprintable() and "*/" not in c and "??" not in c
    assert not c.endswith("\\")


@given(st.lists(st.text(st.sampled_from("ab_/1 .\"'\\\n"), min_size=1, max_size=8),
                unique=True, max_size=30))
def test_generated_identifiers_are_injective(names: list[str]) -> None:
    idents = [identifier(n) for n in names]
    assert len(set(idents)) == len(idents)
    for prefix in ("v", "b", "bl", "l", "g", "R"):
        spelt = [var(n, prefix) for n in names]
        assert all(s.isidentifier() and s.isascii() for s in spelt)
    plain = [n for n in names if n.isidentifier() and "__" not in n and not n.startswith("_")
             and not n.endswith("_")]
    assert all(var(n) == f"v_{n}" for n in plain)     # the usual names read as themselves


NESTED = """model nested
weights "w.npz"
input x: float64[3]
h__linear = linear(x, @a)
h = relu(linear(h__linear, @b))
output y = linear(h, @c)
"""


def test_a_node_named_like_a_nested_value_compiles_to_the_same_numbers(in_tmp: Path) -> None:
    rng = np.random.default_rng(3)
    np.savez(in_tmp / "w.npz", **{"a.weight": rng.standard_normal((3, 3)),
                                  "a.bias": rng.standard_normal(3),
                                  "b.weight": rng.standard_normal((4, 3)),
                                  "b.bias": rng.standard_normal(4),
                                  "c.weight": rng.standard_normal((2, 4)),
                                  "c.bias": rng.standard_normal(2)})
    (in_tmp / "nested.pbx").write_text(NESTED, encoding="utf-8")
    model = pbxc.load(in_tmp / "nested.pbx")
    assert {"h__linear", "h/linear"} <= set(model.graph.digraph.nodes)
    x = rng.standard_normal((6, 3))
    assert main(["compile", "nested.pbx", "-o", "np"]) == 0
    module = import_file(in_tmp / "np" / "nested.py", "secout_nested")
    np.testing.assert_allclose(module.forward(x)["y"], model.forward(x), rtol=1e-13)
    np.testing.assert_allclose(module.jacobian(x), model.jacobian(x).jacobian, rtol=1e-12)
    # the CUDA target runs the same collision in the hostile model above (one shim build)


# ---------------------------------------------------------------- the compiled module's inputs


def test_the_compiled_module_checks_its_inputs_as_the_runtime_does(in_tmp: Path) -> None:
    rng = np.random.default_rng(4)
    np.savez(in_tmp / "w.npz", **{"a.weight": rng.standard_normal((3, 3)),
                                  "a.bias": rng.standard_normal(3),
                                  "b.weight": rng.standard_normal((4, 3)),
                                  "b.bias": rng.standard_normal(4),
                                  "c.weight": rng.standard_normal((2, 4)),
                                  "c.bias": rng.standard_normal(2)})
    (in_tmp / "nested.pbx").write_text(NESTED, encoding="utf-8")
    model = pbxc.load(in_tmp / "nested.pbx")
    assert main(["compile", "nested.pbx", "-o", "np"]) == 0
    module = import_file(in_tmp / "np" / "nested.py", "secout_inputs")
    x = rng.standard_normal((2, 3))
    cases: list[tuple[object, type[Exception], str]] = [
        (x.astype(np.complex128), TypeError, "expected real numbers"),
        (np.array([["a", "b", "c"]]), TypeError, "expected real numbers"),
        (np.array([[1, None, 2]], dtype=object), TypeError, "expected real numbers"),
        (None, TypeError, "expected real numbers"),
        ({"nope": x}, ValueError, "missing \\['x'\\], unexpected \\['nope'\\]"),
        (x[0], ValueError, "expected \\[batch, 3\\]"),
        (np.full((1, 3), np.nan), ValueError, "non-finite"),
    ]
    for bad, error, message in cases:
        for call in (module.forward, module.gradient, module.jacobian, module.dfd,
                     module.lrp):
            with pytest.raises(error, match=message):
                call(bad)
        with pytest.raises(pbxc.PbxError):
            model.forward(bad)        # the runtime refuses each one too
    # a list is an array, as for the runtime
    np.testing.assert_allclose(module.forward(x.tolist())["y"], model.forward(x), rtol=1e-13)
    with pytest.raises(ValueError, match="class indices"):
        module.gradient(x, target=7)
    with pytest.raises(ValueError, match="float32 or float64"):
        module.forward(x, dtype="int8")

"""Issue #10, weight and input files: only the keys a model binds are read, every size a file
declares is checked before anything is allocated, and lies are refused with an error.

Each case asserts the error text and exit code (or the exception), that no canary file
appeared and that the folder holds only what the test put there (specs/security.md, Inputs).
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.errors import WeightError

MODEL = 'model m\nweights "{file}"\ninput x: float64[4]\noutput y = linear(x, @fc)\n'
WEIGHTS = {"fc.weight": np.arange(8.0).reshape(2, 4), "fc.bias": np.array([0.5, -1.0])}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def lying_npy(shape: tuple[int, ...], data: bytes = b"\0" * 64) -> bytes:
    """An .npy whose header declares ``shape`` (float64) but holds only ``data``."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    text = repr(header).encode("latin1")
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def write_zip(path: Path, members: dict[str, bytes],
              compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def patch_declared_size(path: Path, member: str, size: int) -> None:
    """Make the archive's central directory claim ``size`` uncompressed bytes for ``member``."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    while data[at + 46:at + 46 + len(member)] != member.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    struct.pack_into("<I", data, at + 24, size)
    path.write_bytes(bytes(data))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_unused_member_is_never_decompressed(tmp_path: Path) -> None:
    # 128 MiB of zeros compress to ~130 KB; np.load used to decompress it with the rest
    np.savez_compressed(tmp_path / "w.npz", unused=np.zeros(16 << 20), **WEIGHTS)
    (tmp_path / "m.pbx").write_text(MODEL.format(file="w.npz"), encoding="utf-8")
    tracemalloc.start()
    try:
        model = pbxc.load(tmp_path / "m.pbx")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"peak {peak / 2**20:.0f} MiB: the unused member was read"
    np.testing.assert_allclose(model.forward(np.ones((1, 4))), [[6.5, 21.0]])
    assert files_in(tmp_path) == ["m.pbx", "w.npz"]


def test_header_that_lies_about_its_size_is_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # declares 10^8 x 10^6 float64 (728 TiB) and holds 64 bytes: np.load tried to allocate it
    write_zip(tmp_path / "w.npz", {"fc.weight.npy": lying_npy((100_000_000, 1_000_000)),
                                   "fc.bias.npy": npy_bytes(WEIGHTS["fc.bias"])})
    (tmp_path / "m.pbx").write_text(MODEL.format(file="w.npz"), encoding="utf-8")
    code = main(["check", str(tmp_path / "m.pbx")])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith(f"{tmp_path / 'm.pbx'}:2:9: error: weight file '{tmp_path / 'w.npz'}'"
                          ": key 'fc.weight' declares shape [100000000, 1000000] of float64 "
                          "(727.6 TiB) but the archive member holds 64 bytes of data: the file "
                          "is corrupt or lies about its size")
    assert files_in(tmp_path) == ["m.pbx", "w.npz"]


def test_archive_that_lies_about_a_member_size_is_refused(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "w.npz", **WEIGHTS)
    patch_declared_size(tmp_path / "w.npz", "fc.weight.npy", 0xFFFFFF00)
    with pytest.raises(WeightError, match=r"key 'fc.weight' claims 4.0 GiB from .* compressed, "
                                          r"more than deflate can produce"):
        pbxc.loads(MODEL.format(file="w.npz"), str(tmp_path / "m.pbx"))
    np.savez(tmp_path / "s.npz", **WEIGHTS)  # stored: its sizes must agree exactly
    patch_declared_size(tmp_path / "s.npz", "fc.bias.npy", 1 << 31)
    with pytest.raises(WeightError, match=r"key 'fc.bias' is stored uncompressed but claims "
                                          r"2147483648 bytes in \d+"):
        pbxc.loads(MODEL.format(file="s.npz"), str(tmp_path / "m.pbx"))


def test_member_over_the_array_limit_is_refused_before_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez(tmp_path / "w.npz", **WEIGHTS)
    monkeypatch.setenv("PBXC_MAX_ARRAY_BYTES", "32")
    with pytest.raises(WeightError, match=r"key 'fc.weight' declares shape \[2, 4\] of float64 "
                                          r"\(64 B\), over the limit of 32 B for one array "
                                          r"\(PBXC_MAX_ARRAY_BYTES\)"):
        pbxc.loads(MODEL.format(file="w.npz"), str(tmp_path / "m.pbx"))


def test_pickled_member_is_refused_without_running_it(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(canary),))

    obj = np.empty(1, dtype=object)
    obj[0] = Payload()
    np.savez(tmp_path / "w.npz", **{"fc.weight": obj, "fc.bias": WEIGHTS["fc.bias"]})
    with pytest.raises(WeightError, match=r"refused to load key 'fc.weight'.*pickled"):
        pbxc.loads(MODEL.format(file="w.npz"), str(tmp_path / "m.pbx"))
    assert not canary.exists()


def test_safetensors_header_lies_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(WEIGHTS, str(tmp_path / "w.safetensors"))
    model = pbxc.loads(MODEL.format(file="w.safetensors"), str(tmp_path / "m.pbx"))
    np.testing.assert_allclose(model.forward(np.ones((1, 4))), [[6.5, 21.0]])
    header = json.dumps({"fc.weight": {"dtype": "F64", "shape": [100000000, 1000000],
                                       "data_offsets": [0, 64]}}).encode()
    (tmp_path / "lie.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                               + b"\0" * 64)
    (tmp_path / "big.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    for name in ("lie", "big"):
        with pytest.raises(WeightError, match=rf"cannot read weight file '.*{name}.safetensors'"):
            pbxc.loads(MODEL.format(file=f"{name}.safetensors"), str(tmp_path / "m.pbx"))


def _model(tmp_path: Path) -> Path:
    np.savez(tmp_path / "w.npz", **WEIGHTS)
    path = tmp_path / "m.pbx"
    path.write_text(MODEL.format(file="w.npz"), encoding="utf-8")
    return path


def test_input_npy_that_lies_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    path = _model(tmp_path)
    (tmp_path / "x.npy").write_bytes(lying_npy((100_000, 4)))
    code = main(["run", str(path), "--input", str(tmp_path / "x.npy")])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith(f"error: cannot read '{tmp_path / 'x.npy'}': 'x.npy' declares shape "
                          "[100000, 4] of float64 (3.1 MiB) but holds 64 bytes of data")
    (tmp_path / "x.npy").write_bytes(lying_npy((10**15, 10**6)))
    assert main(["explain", str(path), "-m", "gradient", "-i", str(tmp_path / "x.npy")]) == 1
    assert "over the limit of 4.0 GiB for one array" in capsys.readouterr()[1]
    assert files_in(tmp_path) == ["m.pbx", "w.npz", "x.npy"]


def test_input_npz_reads_only_the_chosen_key(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = _model(tmp_path)
    write_zip(tmp_path / "x.npz", {"inputs.npy": npy_bytes(np.ones((3, 4))),
                                   "junk.npy": lying_npy((10**6,))})
    code = main(["run", str(path), "--input", str(tmp_path / "x.npz"), "--key", "inputs"])
    out, err = capsys.readouterr()
    assert code == 1  # the lying member is refused even unused: the archive is corrupt
    assert "key 'junk' declares shape [1000000] of float64" in err
    np.savez_compressed(tmp_path / "y.npz", inputs=np.ones((3, 4)), big=np.zeros(16 << 20))
    tracemalloc.start()
    try:
        code = main(["run", str(path), "--input", str(tmp_path / "y.npz"), "--key", "inputs"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out, err = capsys.readouterr()
    assert code == 0 and "y: [3, 2]" in out, err
    assert peak < 32 << 20
    assert files_in(tmp_path) == ["m.pbx", "w.npz", "x.npz", "y.npz"]


def test_verify_block_data_file_is_checked_the_same_way(tmp_path: Path) -> None:
    # `domain x within 3 std of "d.npz" key "inputs"` reads a data file named by the .pbx
    from pbxc.verify.search import _load_data

    write_zip(tmp_path / "d.npz", {"inputs.npy": lying_npy((10**6, 4)),
                                   "other.npy": npy_bytes(np.ones((2, 4)))})
    with pytest.raises(pbxc.InputError, match=r"key 'inputs' declares shape \[1000000, 4\] of "
                                              r"float64 .* lies about its size"):
        _load_data(tmp_path / "d.npz", "inputs", "x")
    np.savez(tmp_path / "ok.npz", inputs=np.ones((3, 4)), labels=np.zeros(3))
    np.testing.assert_array_equal(_load_data(tmp_path / "ok.npz", "inputs", "x"), np.ones((3, 4)))
    with pytest.raises(pbxc.InputError, match=r"has keys \['inputs', 'labels'\]"):
        _load_data(tmp_path / "ok.npz", None, "x")
    assert files_in(tmp_path) == ["d.npz", "ok.npz"]

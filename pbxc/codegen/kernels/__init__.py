"""Op families' NumPy kernels, one module per family (round 2: ops as units).

Each module is self-contained (numpy only) and uses the uniform kernel signatures of
``pbxc.codegen.numpy_kernels``, which star-imports every family listed here; ``pbxc compile``
copies each family's source verbatim after the kernels', so generated modules hold the same
code. Top-level names are unique across all of them (tests/unit/runtime/test_families.py):
a family's private helpers carry its prefix.
"""

FAMILIES = ("pooling", "resize", "elementwise", "shape",
            "tensor")  # issue 12 (tensor ops)

"""Interoperation: ONNX import (``pbxc import``)."""

from pbxc.interop.onnx_import import SUPPORTED_OPS, ImportResult, convert_onnx, import_onnx

__all__ = ["SUPPORTED_OPS", "ImportResult", "convert_onnx", "import_onnx"]

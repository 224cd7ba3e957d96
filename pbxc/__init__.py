"""pbxc: a symbolic graph compiler and verifier for neural-network attribution."""

from pbxc.codegen.kernels.conv import conv_workspace, set_conv_workspace
from pbxc.errors import (
    InputError,
    PbxError,
    PbxSyntaxError,
    PbxValidationError,
    SourcePos,
    UnsupportedOp,
    VerificationError,
    WeightError,
)
from pbxc.pipeline import check_file, load, loads
from pbxc.runtime.model import Model

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "Model",
    "PbxError",
    "PbxSyntaxError",
    "PbxValidationError",
    "SourcePos",
    "UnsupportedOp",
    "VerificationError",
    "WeightError",
    "__version__",
    "check_file",
    "conv_workspace",
    "load",
    "loads",
    "set_conv_workspace",
]

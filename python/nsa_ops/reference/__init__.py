"""Plain-PyTorch reference compositions (oracles) shipped with the package, so that users can check the
operators and the layer against them. They call no nsa-ops operator.

* :func:`nsa_layer_reference`: the NSA layer of docs/spec/nsa_layer.md §7 (float64 by default), with its steps
  :func:`compress_tokens`, :func:`compressed_branch`, :func:`selected_branch` and :func:`window_branch`.
"""

from .nsa_layer import (
    CONFIG_NAMES,
    PARAMETER_NAMES,
    CompressedBranch,
    NSAReferenceOutput,
    compress_tokens,
    compressed_branch,
    nsa_layer_reference,
    selected_branch,
    window_branch,
)

__all__ = [
    "CONFIG_NAMES",
    "PARAMETER_NAMES",
    "CompressedBranch",
    "NSAReferenceOutput",
    "compress_tokens",
    "compressed_branch",
    "nsa_layer_reference",
    "selected_branch",
    "window_branch",
]

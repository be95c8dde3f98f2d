"""One place that compiles learnscope's fused kernels (``compile_statistics=True``).

Each kernel is a plain function compiled once per process with ``torch.compile``
(dynamic shapes: one graph for every size). If compiling or running it fails (no C++
compiler on CPU, no Triton on CUDA, an unsupported dtype) there is one warning, the
function is marked failed for the rest of the process and the caller takes its eager
path: training goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

# the compiled form of each kernel, shared by every callback in the process; None once it failed
_KERNELS: dict[Callable[..., Any], Any] = {}


def call_compiled(function: Callable[..., Any], *args: Any, purpose: str) -> Any | None:
    """``torch.compile(function, dynamic=True)(*args)``, compiled on first use; None when
    compiling or running fails now (one RuntimeWarning naming ``purpose``) or failed before."""
    if _KERNELS.get(function, False) is None:
        return None
    try:
        kernel = _KERNELS.get(function)
        if kernel is None:
            kernel = _KERNELS[function] = torch.compile(function, dynamic=True)
        return kernel(*args)
    except Exception as err:  # a missing toolchain or an unsupported dtype / device
        _KERNELS[function] = None
        warnings.warn(
            f"learnscope: {purpose} but torch.compile failed ({type(err).__name__}: {err}); "
            "using the eager computation instead. Training goes on.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None

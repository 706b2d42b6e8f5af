"""dreamlab's own CUDA Gaussian rasterizer (``dreamlab.cuda_ext``): kernel sources and lazy loader.

Importing compiles nothing. :func:`load_extension` builds the kernels with
``torch.utils.cpp_extension.load`` on first use on a CUDA machine (once; then cached under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/dreamlab/torch_extensions``) and never without CUDA;
``python -m dreamlab.cuda_ext.build`` builds ahead of time. :mod:`.composite` wraps the kernels.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("rasterizer.cu", "bindings.cpp")
"""Compiled sources, relative to :data:`SOURCE_DIR`."""
HEADERS = ("rasterizer.h",)
EXTENSION_NAME = "dreamlab_rasterizer"


class CudaExtensionError(RuntimeError):
    """The CUDA rasterizer cannot be built or loaded here; the message says why and what to do."""


_lock = threading.Lock()
_module: ModuleType | None = None
_error: CudaExtensionError | None = None


def source_paths() -> list[Path]:
    """Absolute paths of the sources that are compiled (headers not included)."""
    return [SOURCE_DIR / name for name in SOURCES]


def build_directory() -> Path:
    """Where the JIT build and its cache live (created on demand)."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "dreamlab" / "torch_extensions"
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}-py{sys.version_info[0]}{sys.version_info[1]}"
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)
    return base / tag / EXTENSION_NAME


def unavailable_reason(require_device: bool = True) -> str | None:
    """Why the extension cannot be built here (cheap checks, nothing is compiled), or None."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return (
            f"this PyTorch ({torch.__version__}) is built without CUDA (CPU-only); install a CUDA build of "
            "torch (README: GPU users)"
        )
    if require_device and not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    if cpp_extension.CUDA_HOME is None:
        return (
            "no CUDA toolkit found (nvcc): install the CUDA toolkit matching torch.version.cuda "
            f"({torch.version.cuda}) and put nvcc on PATH or set CUDA_HOME"
        )
    if not cpp_extension.is_ninja_available():
        return "the ninja build tool is missing: pip install ninja"
    return None


def load_extension(verbose: bool = False, require_device: bool = True) -> ModuleType:
    """The compiled extension module, built on first call (thread-safe; result cached).

    Raises:
        CudaExtensionError: no CUDA here, no toolkit, or the build failed. The failure is cached
            for the process (a machine that cannot build tries once; restart after fixing it).
    """
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise _error
        reason = unavailable_reason(require_device)
        if reason is not None:
            _error = CudaExtensionError(f"dreamlab's CUDA rasterizer is unavailable: {reason}")
            raise _error
        from torch.utils import cpp_extension

        build_dir = build_directory()
        build_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            module = cpp_extension.load(
                name=EXTENSION_NAME,
                sources=[str(p) for p in source_paths()],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                extra_include_paths=[str(SOURCE_DIR)],
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as exc:  # compiler / toolkit errors come as many exception types
            _error = CudaExtensionError(
                f"building dreamlab's CUDA rasterizer failed ({type(exc).__name__}: {exc}); "
                f"build log in {build_dir}. Use the 'torch' or 'gsplat' backend, or fix the "
                "toolkit (nvcc matching torch.version.cuda, a C++ compiler, ninja) and retry"
            )
            raise _error from exc
        log.info(
            "dreamlab CUDA rasterizer ready in %.1f s (%s)", time.perf_counter() - start, build_dir
        )
        _module = module
        return module


def is_loaded() -> bool:
    """True once :func:`load_extension` has succeeded in this process."""
    return _module is not None


def _reset_for_tests() -> None:
    global _module, _error
    with _lock:
        _module, _error = None, None

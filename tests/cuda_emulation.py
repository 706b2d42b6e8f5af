"""Test helper: dreamlab's CUDA rasterizer kernels compiled for the CPU emulation in ``cuda_cpu/``
(g++ only, no GPU, no nvcc), behind the same four functions as the real extension module, so
``dreamlab.cuda_ext.composite`` and the "cuda" path of ``rasterize_gaussians`` run on CPU tensors.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EMULATOR_DIR = Path(__file__).resolve().parent / "cuda_cpu"


def build_emulator(out_dir: Path) -> Path:
    """Compiles harness.cpp + rasterizer.cu for the CPU into ``out_dir`` (a few seconds)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) to build the CPU emulation of the CUDA kernels")
    lib = out_dir / "libdreamlab_cuda_emulated.so"
    cmd = [
        cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC",
        f"-I{EMULATOR_DIR}", f"-I{REPO / 'cuda_ext'}", str(EMULATOR_DIR / "harness.cpp"),
        "-o", str(lib),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"building the CPU emulation failed:\n{proc.stderr[-4000:]}")
    return lib


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class EmulatedExtension:
    """Mirrors cuda_ext/bindings.cpp (same argument order and outputs) on CPU tensors."""

    def __init__(self, lib_path: Path) -> None:
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.emu_last_error.restype = ctypes.c_char_p

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: {self.lib.emu_last_error().decode()}")

    def emit_intersections(self, rects, ends, rank, per_camera, tiles_x, tiles_y, total):
        keys = torch.empty(total, dtype=torch.int64)
        code = self.lib.emu_emit_intersections(
            _ptr(rects), _ptr(ends), _ptr(rank), ctypes.c_int64(rects.shape[0]),
            ctypes.c_int64(per_camera), ctypes.c_int(tiles_x), ctypes.c_int(tiles_y), _ptr(keys),
        )  # fmt: skip
        self._check(code, "emit_intersections")
        return keys

    def tile_ranges(self, keys, num_tiles):
        ranges = torch.zeros(num_tiles, 2, dtype=torch.int32)
        self._check(
            self.lib.emu_tile_ranges(_ptr(keys), ctypes.c_int64(keys.shape[0]), _ptr(ranges)),
            "tile_ranges",
        )
        return ranges

    def _common(self, means2d, feats, cams, height, width, cutoffs):
        assert means2d.dtype in (torch.float32, torch.float64)
        return [
            ctypes.c_int(means2d.dtype == torch.float64),
        ], [
            ctypes.c_int(feats.shape[1]), ctypes.c_int(cams), ctypes.c_int(height),
            ctypes.c_int(width), *(ctypes.c_double(c) for c in cutoffs),
        ]  # fmt: skip

    def composite_forward(self, ranges, ids, means2d, conic, opac, feats, cams, height, width,
                          *cutoffs):  # fmt: skip
        pixels = cams * height * width
        out = torch.empty(pixels, feats.shape[1], dtype=feats.dtype)
        t_final = torch.empty(pixels, dtype=feats.dtype)
        n_contrib = torch.empty(pixels, dtype=torch.int32)
        head, tail = self._common(means2d, feats, cams, height, width, cutoffs)
        code = self.lib.emu_forward(
            *head, _ptr(ranges), _ptr(ids), _ptr(means2d), _ptr(conic), _ptr(opac), _ptr(feats),
            *tail, _ptr(out), _ptr(t_final), _ptr(n_contrib),
        )  # fmt: skip
        self._check(code, "composite_forward")
        return out, t_final, n_contrib

    def composite_backward(self, ranges, ids, means2d, conic, opac, feats, cams, height, width,
                           a0, a1, t0, q0, t_final, n_contrib, grad_out, grad_t):  # fmt: skip
        grads = [torch.zeros_like(x) for x in (means2d, conic, opac, feats)]
        head, tail = self._common(means2d, feats, cams, height, width, (a0, a1, t0, q0))
        code = self.lib.emu_backward(
            *head, _ptr(ranges), _ptr(ids), _ptr(means2d), _ptr(conic), _ptr(opac), _ptr(feats),
            *tail, _ptr(t_final), _ptr(n_contrib), _ptr(grad_out), _ptr(grad_t),
            *(_ptr(g) for g in grads),
        )  # fmt: skip
        self._check(code, "composite_backward")
        return grads

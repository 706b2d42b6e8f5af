"""Ahead-of-time build of dreamlab's CUDA rasterizer, and the nvcc compile check the tests run.

    python -m dreamlab.cuda_ext.build                 # build into the cache now (CUDA torch + nvcc)
    python -m dreamlab.cuda_ext.build --arch "8.0;9.0"  # ... for these GPUs (no GPU needed here)
    python -m dreamlab.cuda_ext.build --check         # only compile the sources with nvcc: works
                                                      # with a CPU-only torch, builds nothing usable

After an AOT build the first render loads the cached module instead of compiling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dreamlab.cuda_ext import EXTENSION_NAME, SOURCE_DIR

CHECK_ARCHS = ("80", "90")
"""GPU architectures the compile check builds device code for (A100, H100)."""


@dataclass
class CompileStep:
    name: str
    command: list[str]
    seconds: float
    returncode: int
    output: str


def nvcc_executable() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else from PATH, else /usr/local/cuda; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def torch_cxx_standard() -> str:
    """The C++ standard torch's own extension builds use (C++20 in recent releases)."""
    from torch.utils import cpp_extension

    return "c++20" if "c++20" in Path(cpp_extension.__file__).read_text() else "c++17"


def _torch_include_args(stub_dir: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    dirs = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"]]
    # CPU-only torch wheels ship c10/cuda headers but not this generated one; CUDA builds have it.
    if not (Path(torch.__file__).parent / "include/c10/cuda/impl/cuda_cmake_macros.h").is_file():
        header = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(stub_dir))
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return [f"-I{d}" for d in dirs] + [
        f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]


def _run(name: str, cmd: list[str]) -> CompileStep:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return CompileStep(
        name, cmd, time.perf_counter() - start, proc.returncode, proc.stdout + proc.stderr
    )


def _dreamlab_symbols(bindings_obj: Path, kernels_obj: Path) -> tuple[set[str], list[str]]:
    """dreamlab:: functions the bindings call, and those the kernel object lacks (mangled)."""

    def symbols(path: Path, flag: str) -> set[str]:
        out = subprocess.run(["nm", flag, str(path)], capture_output=True, text=True, check=True)
        names = (line.split()[-1] for line in out.stdout.splitlines() if line.strip())
        return {name for name in names if "8dreamlab" in name}

    used = symbols(bindings_obj, "--undefined-only")
    return used, sorted(used - symbols(kernels_obj, "--defined-only"))


def compile_check(out_dir: Path, archs: tuple[str, ...] = CHECK_ARCHS) -> list[CompileStep]:
    """Compiles the CUDA sources with nvcc without linking or loading (no GPU needed).

    Steps: rasterizer.cu as C++17 for every arch in ``archs`` and with torch's C++ standard for
    the last one; bindings.cpp against torch's headers; then a symbol check that the bindings
    only call kernel launchers that rasterizer.cu defines (template instantiations included).
    Stops at the first failing step. Raises FileNotFoundError if nvcc is missing.
    """
    nvcc = nvcc_executable()
    if nvcc is None:
        raise FileNotFoundError(
            "nvcc not found: install the CUDA toolkit (e.g. apt install nvidia-cuda-toolkit, or "
            "NVIDIA's cuda-toolkit package) and put nvcc on PATH or set CUDA_HOME"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    cu = str(SOURCE_DIR / "rasterizer.cu")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    common = ["-O3", f"-I{SOURCE_DIR}", "--expt-relaxed-constexpr"]
    kernels_obj = out_dir / "rasterizer.o"
    std = torch_cxx_standard()
    steps = [
        ("rasterizer.cu (C++17, sm_" + "/sm_".join(archs) + ")",
         [nvcc, "-c", "-std=c++17", *common, *gencode, cu, "-o", str(kernels_obj)]),
        (f"rasterizer.cu ({std}, sm_{archs[-1]})",
         [nvcc, "-c", f"-std={std}", *common, gencode[-1], cu, "-o", str(out_dir / "r2.o")]),
        (f"bindings.cpp (torch headers, {std})",
         [nvcc, "-c", f"-std={std}", "-O0", "-Xcompiler", "-fPIC", f"-I{SOURCE_DIR}",
          *_torch_include_args(out_dir / "stub"), str(SOURCE_DIR / "bindings.cpp"),
          "-o", str(out_dir / "bindings.o")]),
    ]  # fmt: skip
    results = []
    for name, cmd in steps:
        step = _run(name, cmd)
        results.append(step)
        if step.returncode != 0:
            return results
    used, missing = _dreamlab_symbols(out_dir / "bindings.o", kernels_obj)
    results.append(
        CompileStep(
            name=f"symbol check: {len(used)} launchers bindings.o -> rasterizer.o",
            command=["nm"],
            seconds=0.0,
            returncode=1 if missing or not used else 0,
            output="undefined: " + ", ".join(missing) if missing else "",
        )
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compile with nvcc (no GPU)")
    parser.add_argument(
        "--arch",
        default=None,
        help='GPU architectures, TORCH_CUDA_ARCH_LIST style ("8.0;9.0"); default: the GPUs here',
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)

    if args.check:
        archs = (
            tuple(a.replace(".", "") for a in args.arch.split(";")) if args.arch else CHECK_ARCHS
        )
        with tempfile.TemporaryDirectory() as tmp:
            steps = compile_check(Path(tmp), archs)
        for step in steps:
            status = "ok" if step.returncode == 0 else "FAILED"
            print(f"{status:6s} {step.seconds:6.1f} s  {step.name}")
            if step.returncode != 0 or args.verbose:
                print(step.output)
        return 0 if all(s.returncode == 0 for s in steps) else 1

    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    from dreamlab.cuda_ext import CudaExtensionError, build_directory, load_extension

    start = time.perf_counter()
    try:
        load_extension(verbose=args.verbose, require_device=args.arch is None)
    except CudaExtensionError as exc:
        print(f"dreamlab: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"dreamlab CUDA rasterizer built in {time.perf_counter() - start:.1f} s: {build_directory()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

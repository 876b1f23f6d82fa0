"""Build script: the Python package plus the pybind11 extension ``free_kernels._C``.

Static metadata lives in pyproject.toml.  This file only adds the extension,
which CMake builds from csrc/ (see CMakeLists.txt).  It works for
``pip install .``, ``pip install -e .`` and ``pip install --no-build-isolation -e .``.

Environment variables
---------------------
FREE_KERNELS_SKIP_CUDA=1      build the extension without CUDA (host-only:
                              ``_C.built_with_cuda()`` is False, CUDA entry
                              points raise).  Also what happens when no nvcc
                              is found.
FREE_KERNELS_CUDA_ARCHS       CUDA architectures, ';' or ',' separated
                              (default "80;90": sm_80 and sm_90, SASS + PTX).
FREE_KERNELS_BUILD_JOBS       parallel compile jobs (default 2; MAX_JOBS is
                              honoured as a fallback).
FREE_KERNELS_NVCC_THREADS     nvcc --threads per .cu file (default 1).
FREE_KERNELS_BUILD_TYPE       CMake build type (default Release).
FREE_KERNELS_BUILD_DIR        CMake build tree (default build/cmake/<flavour>;
                              kept between builds, so rebuilds are incremental).
FREE_KERNELS_NO_EXTENSION=1   do not build the extension at all.
CUDA_HOME / CUDA_PATH, CUDACXX  where to look for nvcc besides PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MIN_CMAKE = (3, 24)
DEFAULT_ARCHS = "80;90"


def _log(msg: str) -> None:
    print(f"free_kernels setup: {msg}", file=sys.stderr, flush=True)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------- toolchain
def _cmake_version(exe: str) -> Optional[tuple]:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_cmake() -> Optional[str]:
    """A cmake >= 3.24: from PATH first, else from the `cmake` pip package."""
    candidates = [shutil.which("cmake")]
    try:  # pip's cmake (installed as a dynamic build requirement when PATH has none)
        import cmake  # type: ignore

        candidates.append(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))
    except Exception:
        pass
    for exe in candidates:
        if exe and os.path.exists(exe):
            version = _cmake_version(exe)
            if version is not None and version >= MIN_CMAKE:
                return exe
    return None


def find_ninja() -> Optional[str]:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:
        import ninja  # type: ignore

        exe = os.path.join(ninja.BIN_DIR, "ninja")
        return exe if os.path.exists(exe) else None
    except Exception:
        return None


def find_nvcc() -> Optional[str]:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for exe in candidates:
        if exe and os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    return None


def find_cxx() -> Optional[str]:
    for exe in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if exe and shutil.which(exe):
            return shutil.which(exe)
    return None


def cuda_archs() -> str:
    raw = os.environ.get("FREE_KERNELS_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    archs = [a.strip() for a in re.split(r"[;,\s]+", raw) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d+[af]?(-real|-virtual)?", a):
            raise ValueError(
                f"FREE_KERNELS_CUDA_ARCHS: {a!r} is not an architecture such as 80, 90, 90a, 100-real "
                "('native'/'all' are not supported: this build must not depend on the build machine's GPU)"
            )
    return ";".join(archs)


def build_jobs() -> int:
    raw = os.environ.get("FREE_KERNELS_BUILD_JOBS") or os.environ.get("MAX_JOBS") or "2"
    try:
        return max(1, int(raw))
    except ValueError:
        raise ValueError(f"FREE_KERNELS_BUILD_JOBS must be an integer, got {raw!r}") from None


def dynamic_build_requires() -> List[str]:
    """Build tools to fetch only when the machine lacks them (PEP 517 get_requires_*)."""
    reqs = []
    if find_cmake() is None:
        reqs.append(f"cmake>={MIN_CMAKE[0]}.{MIN_CMAKE[1]}")
    if find_ninja() is None:
        reqs.append("ninja")
    return reqs


# ----------------------------------------------------------------- CMake build
class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _cuda_plan():
    """(nvcc or None, why CUDA is off or "")."""
    if _truthy("FREE_KERNELS_SKIP_CUDA"):
        return None, "FREE_KERNELS_SKIP_CUDA=1 at build time"
    nvcc = find_nvcc()
    if nvcc is None:
        return None, "no nvcc found at build time (PATH, CUDACXX, CUDA_HOME, /usr/local/cuda)"
    return nvcc, ""


class CMakeBuild(build_ext):
    """build_ext that configures and builds CMakeLists.txt for CMakeExtension."""

    def run(self) -> None:
        nvcc, disabled_reason = _cuda_plan()
        if nvcc is None and (find_cmake() is None or find_cxx() is None):
            # The host-only extension is optional (the package works without it);
            # drop it so that no later step looks for its file.
            missing = "cmake >= %d.%d" % MIN_CMAKE if find_cmake() is None else "a C++ compiler"
            _log(f"skipping free_kernels._C: {missing} not found and no CUDA ({disabled_reason}); "
                 "ops fall back to their triton/torch backends")
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
            self.distribution.ext_modules = self.extensions
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)

        nvcc, disabled_reason = _cuda_plan()
        cmake = find_cmake()
        cxx = find_cxx()
        if cmake is None:
            raise RuntimeError(
                f"free_kernels: building the CUDA extension needs cmake >= {MIN_CMAKE[0]}.{MIN_CMAKE[1]} "
                "(or set FREE_KERNELS_NO_EXTENSION=1)"
            )

        with_cuda = nvcc is not None
        build_type = os.environ.get("FREE_KERNELS_BUILD_TYPE") or ("Debug" if self.debug else "Release")
        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        flavour = f"py{sys.version_info[0]}{sys.version_info[1]}-{'cuda' if with_cuda else 'host'}-{build_type.lower()}"
        build_dir = Path(os.environ.get("FREE_KERNELS_BUILD_DIR") or ROOT / "build" / "cmake" / flavour).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFREE_KERNELS_OUTPUT_DIR={extdir}",
            "-DFREE_KERNELS_BUILD_EXTENSION=ON",
            "-DFREE_KERNELS_BUILD_TESTS=OFF",
            f"-DFREE_KERNELS_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs()}",
                f"-DFREE_KERNELS_NVCC_THREADS={os.environ.get('FREE_KERNELS_NVCC_THREADS', '1')}",
            ]
        else:
            args.append(f"-DFREE_KERNELS_CUDA_DISABLED_REASON={disabled_reason}")
        if cxx:
            args.append(f"-DCMAKE_CXX_COMPILER={cxx}")

        cache = build_dir / "CMakeCache.txt"
        if not cache.exists():  # the generator of an existing tree cannot change
            ninja = find_ninja()
            if ninja:
                args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        jobs = build_jobs()
        what = f"CUDA ({nvcc}, archs {cuda_archs()})" if with_cuda else f"host-only ({disabled_reason})"
        _log(f"building free_kernels._C: {what}, {build_type}, {jobs} jobs, in {build_dir}")
        t0 = time.perf_counter()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", build_type, "--target", "_C", "--parallel", str(jobs)],
            check=True,
        )
        _log(f"free_kernels._C built in {time.perf_counter() - t0:.1f} s -> {extdir}")


ext_modules = [] if _truthy("FREE_KERNELS_NO_EXTENSION") else [CMakeExtension("free_kernels._C")]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    # Reported by setuptools' PEP 517 backend as extra build requirements;
    # never installed by setup.py itself.
    setup_requires=dynamic_build_requires(),
    zip_safe=False,
)

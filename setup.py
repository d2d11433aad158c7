"""Thin setuptools shim: CMake builds the extensions (as in vLLM)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    """nvcc from CUDACXX, PATH, CUDA_HOME or /usr/local/cuda, else None."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_build() -> tuple[bool, str | None]:
    """Whether to build rag_engine._C_cuda, and the nvcc to use.

    RAG_ENGINE_BUILD_CUDA=1 builds it (nvcc required), =0 never; unset builds it
    only when nvcc and an NVIDIA GPU are both present, so CPU-only builds (CI)
    stay fast and never touch a CUDA toolkit.
    """
    flag = os.environ.get("RAG_ENGINE_BUILD_CUDA", "").strip().lower()
    nvcc = find_nvcc()
    if flag in ("1", "on", "true", "yes"):
        if nvcc is None:
            raise RuntimeError("RAG_ENGINE_BUILD_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
        return True, nvcc
    if flag in ("0", "off", "false", "no"):
        return False, None
    gpus = Path("/proc/driver/nvidia/gpus")
    return (nvcc is not None and gpus.is_dir() and any(gpus.iterdir())), nvcc


BUILD_CUDA, NVCC = cuda_build()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("RAG_ENGINE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DRAG_ENGINE_OUTPUT_DIR={out_dir}",
            f"-DRAG_ENGINE_BUILD_CUDA={'ON' if BUILD_CUDA else 'OFF'}",
        ]
        if BUILD_CUDA:
            args.append(f"-DCMAKE_CUDA_COMPILER={NVCC}")
            archs = os.environ.get("RAG_ENGINE_CUDA_ARCHS") or "80;90"
            args.append(f"-DRAG_ENGINE_CUDA_ARCHS={archs.replace(',', ';')}")
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    # rag_engine.kernels (Triton) lives in kernels/ (package-dir in pyproject.toml)
    packages=[*find_packages(include=["rag_engine*"]), "rag_engine.kernels"],
    # rag_engine._ortops is the ONNX Runtime op library (a plain shared library, named like an
    # extension so that setuptools copies it next to _C, editable installs included)
    ext_modules=[CMakeExtension("rag_engine._C"), CMakeExtension("rag_engine._ortops")]
    + ([CMakeExtension("rag_engine._C_cuda")] if BUILD_CUDA else []),
    cmdclass={"build_ext": CMakeBuild},
)

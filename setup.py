"""Builds the compiled extension ``dancegrpo._C`` from ``csrc/``.

Package metadata lives in pyproject.toml; this file only decides what to compile.

* Always: the C++ CPU kernels (OpenMP, vectorised) and the op registrations.
* Also the CUDA kernels in ``csrc/cuda/*.cu`` when torch was built with CUDA *and* nvcc is
  found (``CUDA_HOME``); the decision uses only the installed torch and the file system, never
  the GPU or the network.
* The extension is compiled against the torch already installed, so the build must see it:
  ``pip install --no-build-isolation .`` (an isolated build stops at once with that advice
  instead of downloading another torch into a throwaway environment; so does an isolated
  sdist build: ``python -m build --no-isolation``).
* The C++ standard is the one the installed torch asks for: ``torch.utils.cpp_extension``
  appends its own (C++17 on older torch, C++20 on recent ones, whose headers require it)
  because no ``-std`` is given here.
* ninja compiles the sources in parallel when present (the ``ninja`` package from PyPI is
  found even in a venv that is not activated); without it setuptools compiles them in turn.
* ``DANCEGRPO_SKIP_EXT=1`` skips the build: the library then runs on its PyTorch backend and
  ``python -m dancegrpo.env`` says why the native backend is unavailable.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# kernels/ is installed as dancegrpo.kernels (see [tool.setuptools] package-dir).
PACKAGES = find_packages("src", include=["dancegrpo", "dancegrpo.*"]) + ["dancegrpo.kernels"]

NO_TORCH = (
    "dancegrpo: torch is not importable in this build environment, and dancegrpo._C must be "
    "compiled against the torch you run. Install torch first, then build without isolation: "
    "`pip install --no-build-isolation .` (or `-e .`), as for flash-attn and xformers. "
    "DANCEGRPO_SKIP_EXT=1 builds a pure-Python package instead (slower PyTorch ops)."
)


def _use_ninja(cpp_extension) -> bool:
    try:
        import ninja  # the PyPI package's binary sits in the venv's bin/, maybe not on PATH
    except ImportError:
        pass
    else:
        bin_dir = getattr(ninja, "BIN_DIR", None)
        if bin_dir and os.path.isdir(bin_dir):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if cpp_extension.is_ninja_available():
        return True
    print("dancegrpo: ninja not found, compiling one file at a time (slower); "
          "`pip install ninja` for a parallel build", file=sys.stderr)
    return False


def _extensions():
    if os.environ.get("DANCEGRPO_SKIP_EXT", "0") == "1":
        print("dancegrpo: DANCEGRPO_SKIP_EXT=1, not building dancegrpo._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # Stop before pip resolves or downloads anything (this runs while pip asks for the
        # build requirements), with the one line that fixes it.
        raise SystemExit(NO_TORCH) from None

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME
    with_cuda = with_cuda and os.environ.get("DANCEGRPO_SKIP_CUDA", "0") != "1"
    # No -std here: BuildExtension adds the standard this torch's headers require.
    cxx = ["-O3", "-fopenmp", "-DNDEBUG", "-g0"]  # -g0: no 16 MB of debug info
    if os.environ.get("DANCEGRPO_NATIVE_ARCH", "0") == "1":
        cxx.append("-march=native")  # opt-in: a wheel built so only runs on this CPU family
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        print(f"dancegrpo: building CPU + CUDA kernels (torch {torch.__version__}, CUDA {torch.version.cuda})",
              file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            "dancegrpo._C", cpu_sources + cuda_sources, define_macros=[("DANCEGRPO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}, **common)
    else:
        reason = (
            "no csrc/cuda sources" if not cuda_sources
            else "torch has no CUDA" if torch.version.cuda is None
            else "nvcc not found (CUDA_HOME unset)" if not cpp_extension.CUDA_HOME
            else "DANCEGRPO_SKIP_CUDA=1"
        )
        print(f"dancegrpo: building CPU kernels only against torch {torch.__version__} ({reason})",
              file=sys.stderr)
        ext = cpp_extension.CppExtension("dancegrpo._C", cpu_sources, extra_compile_args={"cxx": cxx}, **common)
    build = cpp_extension.BuildExtension.with_options(use_ninja=_use_ninja(cpp_extension))
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)

"""Builds the compiled extension ``dancegrpo._C`` from ``csrc/``.

Package metadata lives in pyproject.toml; this file only decides what to compile.

* Always: the C++ CPU kernels (OpenMP, vectorised) and the op registrations.
* Also the CUDA kernels in ``csrc/cuda/*.cu`` when torch was built with CUDA *and* nvcc is
  found (``CUDA_HOME``); the decision uses only the installed torch and the file system, never
  the GPU or the network.
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


def _extensions():
    if os.environ.get("DANCEGRPO_SKIP_EXT", "0") == "1":
        print("dancegrpo: DANCEGRPO_SKIP_EXT=1, not building dancegrpo._C", file=sys.stderr)
        return [], {}
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cpu_sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    import torch

    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME
    with_cuda = with_cuda and os.environ.get("DANCEGRPO_SKIP_CUDA", "0") != "1"
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG", "-g0"]  # -g0: no 16 MB of debug info
    if os.environ.get("DANCEGRPO_NATIVE_ARCH", "0") == "1":
        cxx.append("-march=native")  # opt-in: a wheel built so only runs on this CPU family
    define_macros = []
    if with_cuda:
        print(f"dancegrpo: building CPU + CUDA kernels (CUDA {torch.version.cuda})", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            "dancegrpo._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros + [("DANCEGRPO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        reason = (
            "no csrc/cuda sources" if not cuda_sources
            else "torch has no CUDA" if torch.version.cuda is None
            else "nvcc not found (CUDA_HOME unset)" if not cpp_extension.CUDA_HOME
            else "DANCEGRPO_SKIP_CUDA=1"
        )
        print(f"dancegrpo: building CPU kernels only ({reason})", file=sys.stderr)
        ext = cpp_extension.CppExtension(
            "dancegrpo._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)

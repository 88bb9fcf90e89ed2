"""Build effops from source.

    pip install --no-build-isolation .        # uses the torch already installed; never downloads one
    python setup.py build_ext --inplace       # what `make` does: rebuilds only changed files

Environment:
    EFFOPS_NO_EXT=1        pure-Python install (reference backend only), for machines without a compiler
    EFFOPS_BUILD_CUDA=0/1  force the CUDA kernels off/on (default: on when torch has CUDA and nvcc is found)
    TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0a")
    MAX_JOBS               parallel compile jobs (ninja)

Instruction sets are chosen at run time (target attributes + cpuid), never with -march=native here.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = sorted(set(find_packages(include=["effops", "effops.*"])) | {"effops.triton_kernels"})
# `triton_kernels` is also the import name of Triton's own kernel library: install ours under effops.
PACKAGE_DIR = {"effops.triton_kernels": "triton_kernels"}


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(torch_has_cuda, cuda_home):
    flag = os.environ.get("EFFOPS_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch_has_cuda and cuda_home is not None


def _extensions():
    if os.environ.get("EFFOPS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    build_cuda = _want_cuda(torch.version.cuda is not None, CUDA_HOME)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    # The C++ standard is torch's choice (2.13 builds extensions as C++20, 2.11 as C++17); kernels stay C++17.
    cxx = ["-O3", "-fopenmp", "-g0", "-DEFFOPS_BUILD_CUDA=%d" % int(build_cuda)]
    sources = _sources("csrc/cpu/*.cpp") + _sources("csrc/bindings/*.cpp")
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])
    if build_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/bindings/cuda/*.cpp")
        ext = CUDAExtension("effops._C", sources, extra_compile_args={
            "cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]}, **kwargs)
    else:
        ext = CppExtension("effops._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    name="effops",
    version="0.1.0",
    description="Fused kernels for efficient PyTorch training and inference",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # A range, never a pin: pip must keep the torch the user already has.
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "demo": ["scikit-learn", "tqdm", "matplotlib"]},
)

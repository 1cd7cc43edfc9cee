"""Optional native extension from csrc/: built only on request and only where a compiler exists.

Set QK_BUILD_NATIVE=1 to build it (the README's commands do; QK_BUILD_NATIVE=require also makes a
failed compile fatal). Without the switch, without a C++ compiler, without C++ sources, or when the
compile fails, the package installs as pure Python and falls back to the PyTorch reference for
every native op. Torch must be importable at build time: install with --no-build-isolation.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def native_extensions():
    if os.environ.get("QK_BUILD_NATIVE", "0") in ("", "0"):
        return [], {}
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not sources or not compiler:
        print(f"qlora-kernels: native extension skipped (sources: {len(sources)}, compiler: {compiler})")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("qlora-kernels: native extension skipped (torch is not importable at build time)")
        return [], {}
    # -ffp-contract=off: no fused multiply-adds, so each value is computed with the reference's
    # separately rounded fp32 operations (bit-identical output).
    compile_args = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64"):
        compile_args.append("-march=x86-64-v2")  # SSSE3 byte shuffles; runs on any x86-64 CPU since 2009
    ext = CppExtension(
        "qlora_kernels._native",
        sources,
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        """A failed native build must not fail the install: warn loudly and fall back to the reference."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as err:  # a broken compiler fails torch's checks or the compile, in several ways
                if os.environ.get("QK_BUILD_NATIVE") == "require":
                    raise
                print(
                    f"qlora-kernels: WARNING: the native extension failed to build ({type(err).__name__}: {err}); "
                    "the package falls back to the PyTorch reference. Set QK_BUILD_NATIVE=require to make this fatal."
                )
                self.extensions = []  # nothing built: nothing for the (editable) install to copy

    return [ext], {"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build stage of sgdet's native CPU kernel (sgdet/deploy/native): one optional C++ extension.

pyproject.toml holds the metadata; this file only adds the extension `sgdet.deploy.native._C`.
Build it against the torch that will run it: `pip install --no-build-isolation -e .` (what
`make setup` does). A missing compiler or a failed build never fails the install: one warning
line is printed and `sgdet.deploy.native.available()` is False with the reason."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

NATIVE = os.path.join("sgdet", "deploy", "native")
SOURCES = ["ops.cpp", "kernel_avx512.cpp", "kernel_avx2.cpp", "kernel_portable.cpp", "norm_gather.cpp"]


ERROR_FILE = os.path.join(NATIVE, "_build_error.txt")   # read by sgdet.deploy.native


def _warn(why: str) -> None:
    print(f"WARNING: sgdet native kernel not built ({why}); the torch paths are used instead",
          file=sys.stderr)
    try:   # pip hides a successful build's output: leave the reason where the package looks
        with open(ERROR_FILE, "w") as f:
            f.write(why + "\n")
    except OSError:
        pass


try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except Exception as exc:  # noqa: BLE001 - no torch in the build environment
    _warn(f"torch is not importable at build time: {exc}")
    BuildExtension = CppExtension = None


class OptionalBuildExtension(BuildExtension or object):
    """BuildExtension that compiles the sources in parallel and turns any failure into a
    warning (the package stays usable without the kernel)."""

    def build_extensions(self) -> None:
        compile_one = self.compiler.compile

        def compile_parallel(sources, *args, **kwargs):
            # distutils compiles one source after another; the four files are independent
            jobs = min(len(sources), os.cpu_count() or 1)
            with ThreadPoolExecutor(max(1, jobs)) as pool:
                parts = list(pool.map(lambda s: compile_one([s], *args, **kwargs), sources))
            return [obj for part in parts for obj in part]

        self.compiler.compile = compile_parallel
        try:
            super().build_extensions()
            if os.path.exists(ERROR_FILE):
                os.remove(ERROR_FILE)
        except Exception as exc:  # noqa: BLE001 - compiler missing, headers missing, ...
            _warn(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            self._sgdet_failed = True

    def get_outputs(self):
        # editable installs map the outputs into place: skip the ones a failed build lacks
        outputs = super().get_outputs()
        if getattr(self, "_sgdet_failed", False):
            outputs = [path for path in outputs if os.path.exists(path)]
        return outputs

    def copy_extensions_to_source(self) -> None:
        if not getattr(self, "_sgdet_failed", False):
            super().copy_extensions_to_source()


# No -march: the ISA files carry their own target pragmas; the rest must run on any x86-64.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]

setup(**({} if CppExtension is None else dict(
    ext_modules=[CppExtension(
        name="sgdet.deploy.native._C",
        sources=[os.path.join(NATIVE, name) for name in SOURCES],
        depends=[os.path.join(NATIVE, "kernel.h")],   # an edited header rebuilds the extension
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )],
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=False)},
)))

"""Declares the Cython extension only; all metadata lives in pyproject.toml.

Set RELAYCORE_BUILD_EXTENSION=yes to make a failed compile fatal (CI does);
otherwise a machine without a compiler still gets the pure-Python twin.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("RELAYCORE_BUILD_EXTENSION", "").lower() in ("1", "yes", "true")


class optional_build_ext(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            if REQUIRE:
                raise
            print(f"relaycore: extension not built ({exc}); the pure-Python twin will be used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if REQUIRE:
                raise
            print(f"relaycore: {ext.name} not built ({exc}); the pure-Python twin will be used")


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE:
            raise
        return []
    return cythonize(
        [Extension("relaycore._fastpath", ["src/relaycore/_fastpath.pyx"])],
        compiler_directives={"language_level": "3"},
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": optional_build_ext})

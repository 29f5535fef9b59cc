"""Declares the Cython extension only; all metadata lives in pyproject.toml.

RELAYCORE_BUILD_EXTENSION chooses what happens to the extension:
  yes (or 1, true)   build it; a failed compile is fatal (CI and the Dockerfile set it)
  no  (or 0, false)  do not build it: the pure-Python twin, in a py3-none-any wheel
  unset              try; without a compiler (or Cython) the pure-Python twin is used
A wheel that ends up without the extension, whichever way, is tagged py3-none-any rather
than for the ABI of the Python that built it.
"""

import os

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

SETTING = os.environ.get("RELAYCORE_BUILD_EXTENSION", "").strip().lower()
if SETTING not in ("", "1", "yes", "true", "0", "no", "false"):
    raise SystemExit(f"RELAYCORE_BUILD_EXTENSION must be yes or no, got {SETTING!r}")
REQUIRE = SETTING in ("1", "yes", "true")
SKIP = SETTING in ("0", "no", "false")


class optional_build_ext(build_ext):
    """Builds what it can; ``built`` lists the extensions that exist afterwards."""

    def run(self):
        self.built = []
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
            stale = self.get_ext_fullpath(ext.name)  # an earlier build's, for older sources
            if os.path.exists(stale):
                os.remove(stale)
        else:
            self.built.append(ext.name)


class bdist_wheel_pure_without_extension(bdist_wheel):
    """Tags the wheel py3-none-any when no extension was built into it.

    bdist_wheel decides whether a wheel is pure before anything is compiled (from
    ``has_ext_modules()``), so an optional build that failed would still be tagged for this
    interpreter's ABI, with its files under .data/platlib. Build first, then decide: with no
    extension built, the distribution has none (the install step lays the files out as pure)
    and the wheel is pure.
    """

    def run(self):
        if not self.skip_build:
            self.run_command("build")  # not run again by bdist_wheel.run
            if not getattr(self.get_finalized_command("build_ext"), "built", []):
                self.distribution.ext_modules = []
                self.root_is_pure = True
        super().run()


def extensions():
    if SKIP:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE:
            raise
        print("relaycore: Cython is missing; the pure-Python twin will be used")
        return []
    return cythonize(
        [Extension("relaycore._fastpath", ["src/relaycore/_fastpath.pyx"])],
        compiler_directives={"language_level": "3"},
    )


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": optional_build_ext, "bdist_wheel": bdist_wheel_pure_without_extension},
)

"""Build hook for pyproject.toml's setuptools backend: compiles the memory saver library.

`pip install -e .` and `pip install .` run `build_ext`, which compiles csrc/saver into
trainer/libfp8moe_saver.so with the host C++ compiler and the CUDA headers (csrc/saver/build.py
finds them). The saver links no CUDA library, so this works without a GPU or driver. Where there
is no compiler or no CUDA headers the extension is optional: the install goes on without it, and
trainer.saver reports itself disabled with the reason.
"""
import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent


def _builder():
    spec = importlib.util.spec_from_file_location("saver_build", ROOT / "csrc" / "saver" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildSaver(build_ext):
    """Builds the saver's plain shared library (a ctypes library, not a Python extension)."""

    def get_ext_filename(self, fullname):
        return str(Path(*fullname.split("."))) + ".so"

    def build_extension(self, ext):
        builder = _builder()
        out = Path(self.get_ext_fullpath(ext.name))
        try:
            builder.build_library(out)
        except builder.BuildUnavailable as err:
            raise CompileError(f"memory saver not built, trainer.saver will be disabled: {err}") from err
        except RuntimeError as err:
            raise CompileError(str(err)) from err


setup(
    ext_modules=[Extension("trainer.libfp8moe_saver", sources=[], optional=True)],
    cmdclass={"build_ext": BuildSaver},
)

"""Build of record. Metadata lives in pyproject.toml.

By default the package installs as Python plus its C++ sources (copied into the package),
and the extension compiles on first use (bnlstm_cuda/build.py). With
BNLSTM_BUILD_EXTENSION=1 it compiles now, against the torch already installed:

    BNLSTM_BUILD_EXTENSION=1 pip install --no-build-isolation .
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def load_build_module():
    """bnlstm_cuda/build.py on its own, without importing the package."""
    spec = importlib.util.spec_from_file_location("bnlstm_cuda_build", ROOT / "bnlstm_cuda" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Install csrc/ inside the package, so an installed copy can compile on first use."""

    def run(self):
        super().run()
        shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "bnlstm_cuda" / "csrc", dirs_exist_ok=True)


ext_modules = []
cmdclass = {"build_py": BuildPyWithSources}
if os.environ.get("BNLSTM_BUILD_EXTENSION") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    build = load_build_module()
    ext_modules.append(
        CppExtension(
            f"bnlstm_cuda.{build.PREBUILT_NAME}",
            sources=[f"csrc/{name}" for name in build.CPU_SOURCES],
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=build.cpu_cflags(),
            extra_link_args=build.cpu_ldflags(),
        )
    )
    class BuildExtensionWithKey(BuildExtension.with_options(no_python_abi_suffix=True)):
        """Stamp each library with the key of its sources: an edited checkout rebuilds."""

        def run(self):
            super().run()
            for extension in self.extensions:
                library = Path(self.get_ext_fullpath(extension.name))
                library.with_suffix(".key").write_text(build.source_key(ROOT / "csrc"))

    cmdclass["build_ext"] = BuildExtensionWithKey

setup(ext_modules=ext_modules, cmdclass=cmdclass)

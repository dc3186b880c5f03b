"""Thin setup: Python packages here, the native part (libsdengine + sdengine._C) built by CMake."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()

# The top-level folders that hold a subpackage's modules, without an __init__.py of their own
# (run from the repo root, a package `kernels` there would hide PyPI's `kernels`, which
# transformers imports). Each package's __init__.py lives in sdengine/<name>/ and, in a
# checkout, reaches the folder through its __path__; a wheel carries the modules beside it.
SOURCE_FOLDERS = {"sdengine.kernels": "kernels", "sdengine.export": "export"}


class BuildPy(build_py):
    """The usual build, plus each SOURCE_FOLDERS folder's modules copied into its package
    (not for an editable install, whose packages reach the folders themselves)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for package, folder in SOURCE_FOLDERS.items():
            target = Path(self.build_lib, *package.split("."))
            self.mkpath(str(target))
            for source in sorted((ROOT / folder).glob("*.py")):
                self.copy_file(str(source), str(target / source.name))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt; its outputs land next to sdengine/_C."""

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_RUNTIME_OUTPUT_DIRECTORY={build_dir / 'bin'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SDE_BUILD_TYPE', 'Release')}",
            f"-DSDE_PYTHON_EXT_SUFFIX={Path(self.get_ext_filename('_C')).suffix}",
        ]
        try:  # build the libtorch-backed runtime against the torch that is installed
            import torch.utils

            args.append(f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")
        except ImportError:
            pass
        # /usr/local/bin/nvcc may be a wrapper: point CMake at the real toolkit.
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        if Path(cuda_home, "bin", "nvcc").exists():
            args += [f"-DCUDAToolkit_ROOT={cuda_home}", f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc"]
        args += os.environ.get("SDE_CMAKE_ARGS", "").split()
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)
        self.library_dirs_built = [*getattr(self, "library_dirs_built", []), out_dir]

    def run(self):
        super().run()
        # setuptools builds in place with self.inplace off and copies only _C itself into the
        # source tree afterwards: bring the shared libraries it links (libsdengine.so) along.
        if self.inplace or getattr(self, "editable_mode", False):
            for out_dir in getattr(self, "library_dirs_built", []):
                for lib in out_dir.glob("lib*.so*"):
                    # Copy then rename: a running process that mapped the old file keeps it intact.
                    tmp = ROOT / "sdengine" / f".{lib.name}.tmp"
                    shutil.copy2(lib, tmp)
                    os.replace(tmp, ROOT / "sdengine" / lib.name)


setup(
    packages=find_packages(include=["sdengine", "sdengine.*"]),
    package_data={"sdengine": ["data/*", "data/**/*"], "sdengine.serve": ["ui/*"]},  # ui: the web UI's files
    include_package_data=True,
    # SDE_NO_NATIVE=1: the Python packages alone (no libsdengine, no sdengine._C; the native
    # backend is then unavailable), e.g. where the C++ build cannot run.
    ext_modules=[] if os.environ.get("SDE_NO_NATIVE") == "1" else [CMakeExtension("sdengine._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    zip_safe=False,
)

"""Package list only; all metadata lives in pyproject.toml.

`kernels` is taken by a dependency of SGLang, so the top-level kernels/ folder installs under the
import name `sparrow_kernels` (a package-dir mapping that pyproject's `find` cannot express).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["sparrow_megatron*", "sglang_patches*"])
packages += ["sparrow_kernels" + name[len("kernels") :] for name in find_packages(include=["kernels*"])]

setup(packages=packages, package_dir={"sparrow_kernels": "kernels"})

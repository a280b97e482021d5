"""Build script. Metadata lives in pyproject.toml; this file is where the C++/CUDA
extension will be declared."""

from setuptools import setup

setup()

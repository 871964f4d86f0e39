"""Build of record. Metadata lives in pyproject.toml; the package is pure Python for now
(the compiled backends of later releases build on first use)."""
from setuptools import setup

setup()

# setuptools needs a setup.py to build the cffi extension (hatchling cannot).
from setuptools import setup

setup(cffi_modules=["uffd_aio/ring/_build.py:ffibuilder"])

# setuptools needs a setup.py to build the cffi extensions (hatchling cannot): the
# product's uffd_aio.binding._native and the test helpers' uffd_aio.testing._helpers.
from setuptools import setup

setup(cffi_modules=["uffd_aio/binding/_build.py:ffibuilder",
                    "uffd_aio/testing/_build.py:ffibuilder"])

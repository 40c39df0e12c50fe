"""Build of the compiled core: the C twins of ProtoBase's hot pure-Python modules.

Everything else about the package is in pyproject.toml. Each extension is
optional: without a C compiler (or Python headers) the build still succeeds
and ProtoBase runs on its pure-Python modules, warning once at import how to
get the fast build (protobase/native.py).
"""

from setuptools import Extension, setup

_FLAGS = [
    "-O2",
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Wno-missing-field-initializers",
]

setup(
    ext_modules=[
        Extension("protobase.core.ccodec", ["protobase/core/ccodec.c"], optional=True, extra_compile_args=_FLAGS),
        # point searches in encoded tree nodes (btree/search.py); uses ccodec's unpack, so built alike
        Extension("protobase.core.cnode", ["protobase/core/cnode.c"], optional=True, extra_compile_args=_FLAGS),
        # atoms framed into a segment (arena.write_atoms): the coordinator's appends of many records
        Extension("protobase.core.carena", ["protobase/core/carena.c"], optional=True, extra_compile_args=_FLAGS),
    ],
)

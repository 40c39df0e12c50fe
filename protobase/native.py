"""The compiled core: which C twins of the pure-Python hot paths this process uses.

Owns the choice between a compiled module and its pure-Python original,
made once per process at import: the compiled one when it was built and
`PROTOBASE_PURE_PYTHON` is not `1`, otherwise the original. Runs in every
process; a coordinator, persistence process or pool worker started by this
one inherits the environment, so they choose alike (and either choice writes
the same bytes, so mixing them would be slower, never wrong).

Invariant: a compiled module is used only if it imported, and a missing
build is reported once per process (naming the first module missing), with
how to get it, never silently.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from types import ModuleType

__all__ = ["PURE_PYTHON", "load"]

#: Set in the environment to `1` to run the pure-Python modules even where the compiled ones are built.
PURE_PYTHON = os.environ.get("PROTOBASE_PURE_PYTHON") == "1"

_loaded: dict[str, bool] = {}  # {compiled module name -> whether this process uses it}

BUILD_HINT = (
    "install a C compiler and the Python headers (for example `apt-get install gcc python3-dev`) and "
    "reinstall protobase from source (`pip install --force-reinstall --no-binary protobase protobase`; in a "
    "checkout, `pip install -e .` builds it next to the sources); set PROTOBASE_PURE_PYTHON=1 to choose "
    "the pure-Python modules without this warning"
)


def load(name: str) -> ModuleType | None:
    """The compiled module `name`, or None when this process runs the pure-Python original."""
    if name in _loaded:  # asked before (one compiled module may serve several Python ones): decided, warned
        return sys.modules[name] if _loaded[name] else None
    if PURE_PYTHON:
        _loaded[name] = False
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        already_warned = False in _loaded.values()  # one build makes them all: its hint is said once
        _loaded[name] = False
        if already_warned:
            return None
        warnings.warn(
            f"ProtoBase's compiled core ({name}) is not built ({error}), so it runs on pure Python, several "
            f"times slower on writes and cold reads; {BUILD_HINT}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _loaded[name] = True
    return module

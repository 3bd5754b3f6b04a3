"""redoxcap: the supervisor and the `redoxcap` command, and the layers of the system.

The layers are subpackages: `redoxcap.wire` (what every process shares),
`redoxcap.kernel` (the router), `redoxcap.nsmgr` and `redoxcap.schemes`. In
the repository they are the top-level folders wire/, kernel/, nsmgr/ and
schemes/; an installed wheel holds them inside this package (pyproject.toml
maps them), so that only `rt` and `redoxcap` are top-level names.
"""

import os
import sys

# In a source checkout (this package without the layers inside it, and the repository's
# folders beside it) the layers are found beside it, as the installed wheel has them inside.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "wire")) and \
        os.path.isfile(os.path.join(_checkout, "wire", "ops.py")) and \
        os.path.isfile(os.path.join(_checkout, "pyproject.toml")):
    __path__.append(_checkout)
del _checkout

# How the system starts a Python process of its own (the router, nsmgr, the schemes, the
# supervisor, the sandbox launcher): -E ignores PYTHONPATH and the other PYTHON* variables of
# whoever typed the command, -P leaves the current directory off sys.path, so that a `wire/`
# or `redoxcap/` package in a user's project never runs as part of the system.
PYTHON = (sys.executable, "-E", "-P")

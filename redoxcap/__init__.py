"""The supervisor: the `redoxcap` command, booting and watching the system."""

import sys

# How the system starts a Python process of its own (the router, nsmgr, the schemes, the
# supervisor, the sandbox launcher): -E ignores PYTHONPATH and the other PYTHON* variables of
# whoever typed the command, -P leaves the current directory off sys.path, so that a `wire/`
# or `redoxcap/` package in a user's project never runs as part of the system.
PYTHON = (sys.executable, "-E", "-P")

"""`python -P -m redoxcap.sandbox [options] -- COMMAND ARGS...`: the confinement launcher.

Run it with ``-E -P``: a `redoxcap` package planted in the current directory (or in
PYTHONPATH) must never run in its place. (`redoxcap run --no-broker` needs no launcher
process: it takes the same steps in a fork of itself, :func:`redoxcap.sandbox.spawn_confined`.)
"""

import sys

from redoxcap.sandbox.launcher import main

sys.exit(main())

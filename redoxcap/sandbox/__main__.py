"""`python -P -m redoxcap.sandbox [options] -- COMMAND ARGS...`: the confinement launcher.

Run it with ``-P``: a `redoxcap` package planted in the current directory must
never run in its place (see :func:`redoxcap.run.confined_argv`).
"""

import sys

from redoxcap.sandbox.launcher import main

sys.exit(main())

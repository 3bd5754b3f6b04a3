"""Unmodified programs inside their capabilities: a seccomp user-notification broker.

A program that knows nothing of redoxcap makes ordinary syscalls; a seccomp
filter (filter.py) hands every path-taking one to the broker process
(server.py), which reads its arguments once from the program's memory
(memory.py), resolves them through the program's namespace and cwd
capabilities as rt would (calls/, state.py), and answers with an errno,
a value, or an fd installed in the program (notify.py). The interpreter,
libraries and system files a program needs to start come read-only from a
short host allow-list (hostfs.py); regular files of the file scheme come as
host fds (passthrough), so their data never crosses the broker. The child's
side (Landlock, the filter, the listener handed over, exec) is launcher.py.

See docs/sandbox.md, "Unmodified programs".
"""

from redoxcap.broker.server import (
    BrokeredProgram,
    Unavailable,
    available,
    host_trees_for,
    run_brokered,
    start_brokered,
)

__all__ = ["BrokeredProgram", "Unavailable", "available", "host_trees_for", "run_brokered",
           "start_brokered"]

"""Try to get out of a sandbox and report what each attempt gets.

    redoxcap run --ns '' --cwd /jail --beneath --no-broker -- python examples/sandboxed.py

Run this way, the program holds an empty namespace and a cwd opened with
O_RESOLVE_BENEATH, and Landlock and seccomp stop it from going around rt.
"""

import errno
import socket
from pathlib import Path

import rt


def attempt(what, fn):
    try:
        result = fn()
        print(f"{what:<44} ok {result if result is not None else ''}")
    except OSError as exc:
        print(f"{what:<44} {errno.errorcode.get(exc.errno, exc.errno)}")


print("cwd:", rt.getcwd(), " schemes:", rt.schemes())
attempt("list the cwd", lambda: rt.listdir())
attempt("chdir ..", lambda: rt.chdir(".."))
attempt("open ../secret.txt", lambda: rt.open("../secret.txt"))
attempt("open /secret.txt (namespace)", lambda: rt.open("/secret.txt"))
attempt("open /etc/passwd around rt", lambda: Path("/etc/passwd").read_text()[:10])
attempt("TCP connect to 127.0.0.1:22", lambda: socket.create_connection(("127.0.0.1", 22), 1))
attempt("UDP socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
print("cwd still:", rt.getcwd())

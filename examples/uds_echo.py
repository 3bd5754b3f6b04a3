"""An echo server and client over the uds scheme, with a capability passed across.

    redoxcap run --uds-scope demo -- python examples/uds_echo.py server NAME
    redoxcap run --uds-scope demo -- python examples/uds_echo.py client NAME "some text"

Every run has a private uds scope of its own unless it names one to share:
both runs say `--uds-scope demo`, so NAME means the same listener to both
(without it, the client's open fails with ECONNREFUSED).

The client sends its text and then a capability: an fd for a file it opened
(`/shared.txt`, created if missing). The server echoes the text and reads the
file through the fd it received: it never opens the file by name. (A uds
capability itself cannot travel over uds: sendfd refuses it with EINVAL.)
"""

import socket
import sys

import rt


def server(name: str) -> None:
    listener = rt.open(f"/scheme/uds/{name}", rt.O_CREAT | rt.O_RDWR)
    print("listening", flush=True)
    conn = rt.dup(listener, b"accept")
    text = rt.read(conn, 4096)
    rt.write(conn, text)
    cap = rt.recvfd(conn)
    print("received a capability for", rt.fpath(cap), "holding:", rt.read(cap, 100).decode().strip())
    rt.close(cap)
    rt.close(conn)
    rt.close(listener)


def client(name: str, text: str) -> None:
    conn = rt.open(f"/scheme/uds/{name}", rt.O_RDWR)
    rt.write(conn, text.encode())
    print("echoed:", rt.read(conn, 4096).decode())
    with rt.open_file("/shared.txt", "w") as f:
        f.write("a file only the client opened\n")
    fd = rt.open("/shared.txt")
    rt.sendfd(conn, fd)
    rt.close(fd)
    rt.shutdown(conn, socket.SHUT_WR)
    rt.close(conn)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2])
    else:
        client(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "hello over uds")

"""An echo server and client over the tcp scheme.

    redoxcap run -- python examples/tcp_echo.py server [PORT]  # prints the port it listens on
    redoxcap run -- python examples/tcp_echo.py client PORT  "some text"

The server listens on 127.0.0.1 port PORT, or 0 (`fpath` says which port it got),
accepts one connection with dup(fd, b"accept") and echoes until EOF. Neither
program touches a socket itself: confined, they could not.
"""

import socket
import sys

import rt


def server(port: str = "0") -> None:
    listener = rt.open(f"/scheme/tcp/127.0.0.1/{port}", rt.O_CREAT | rt.O_RDWR)
    print("listening on", rt.fpath(listener).rsplit("/", 1)[1], flush=True)
    conn = rt.dup(listener, b"accept")
    while data := rt.read(conn, 4096):
        rt.write(conn, data)
    rt.close(conn)
    rt.close(listener)


def client(port: str, text: str) -> None:
    conn = rt.open(f"/scheme/tcp/127.0.0.1/{port}", rt.O_RDWR)
    rt.write(conn, text.encode())
    rt.shutdown(conn, socket.SHUT_WR)  # the server reads EOF after our text
    echoed = b""
    while data := rt.read(conn, 4096):
        echoed += data
    print("echoed:", echoed.decode())
    rt.close(conn)


if __name__ == "__main__":
    if sys.argv[1:2] == ["server"]:
        server(*sys.argv[2:3])
    else:
        client(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "hello over tcp")

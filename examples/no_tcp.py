"""A client whose namespace holds only file and uds: tcp is not there to reach.

    redoxcap run --ns file,uds -- python examples/no_tcp.py
"""

import errno

import rt

print("my schemes:", rt.schemes())
for path in ("/scheme/tcp/127.0.0.1/80", "tcp:127.0.0.1/80", "/scheme/udp/127.0.0.1/53"):
    try:
        rt.open(path, rt.O_RDWR)
        print(path, "-> reached (this should not happen)")
    except OSError as exc:
        print(path, "->", errno.errorcode[exc.errno])

"""`python -m kernel --kernel-fd N`: run the router on an inherited kernel capability."""

import argparse
import logging

import trio

from kernel.router import main
from rt.limits import raise_fd_limit

parser = argparse.ArgumentParser(prog="python -m kernel", description=__doc__)
parser.add_argument("--kernel-fd", type=int, required=True,
                    help="inherited SOCK_SEQPACKET socket served as the kernel capability")
parser.add_argument("--trace", action="store_true",
                    help="log every request and reply: pid, scheme id, handle, operation")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO if args.trace else logging.WARNING, format="kernel[%(process)d] %(levelname)s %(message)s")
raise_fd_limit()
trio.run(main, args.kernel_fd, args.trace)

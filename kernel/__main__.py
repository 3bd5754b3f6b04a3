"""`python -m redoxcap.kernel --kernel-fd N`: run the router on an inherited kernel capability."""

import argparse
import logging

import trio

from redoxcap.kernel import accounts
from redoxcap.kernel.accounts import Limits
from redoxcap.kernel.router import Router
from redoxcap.wire.limits import forbid_core_dumps, raise_fd_limit

forbid_core_dumps()  # before anything of a client's could be in memory


async def serve(kernel_fd: int, verbose: bool, client_limits: Limits,
                system_limits: Limits) -> None:
    """Run the router until the supervisor's kernel capability is closed.

    Args:
        kernel_fd: an inherited SOCK_SEQPACKET socket to serve as the first
            kernel capability (the supervisor holds its other end).
        verbose: log each request the router refuses itself.
        client_limits: the default limits of accounts made by ACCOUNT_NEW.
        system_limits: the limits of the system account (the kernel capability's).
    """
    async with trio.open_nursery() as nursery:
        router = Router(nursery, verbose, client_limits, system_limits)
        try:
            router.table.adopt_supervisor(kernel_fd)
            await router.supervisor_gone.wait()
        finally:
            nursery.cancel_scope.cancel()
    router.close()


parser = argparse.ArgumentParser(prog="python -m redoxcap.kernel", description=__doc__)
parser.add_argument("--kernel-fd", type=int, required=True,
                    help="inherited SOCK_SEQPACKET socket served as the kernel capability")
parser.add_argument("--verbose", action="store_true",
                    help="log each request the router refuses itself (out of fds, over a quota); "
                         "the trace of every call is the kernel operation TRACE")
parser.add_argument("--max-caps-per-account", type=int, default=accounts.MAX_CAPS_PER_ACCOUNT,
                    help="capabilities a client account may hold; more is EMFILE")
parser.add_argument("--max-inflight-per-account", type=int, default=accounts.MAX_INFLIGHT_PER_ACCOUNT,
                    help="requests of a client account in flight before its reading pauses")
parser.add_argument("--max-inflight-per-cap", type=int, default=accounts.MAX_INFLIGHT_PER_CAP,
                    help="requests in flight on one client capability before its reading pauses")
parser.add_argument("--max-queued-bytes-per-account", type=int,
                    default=accounts.MAX_QUEUED_BYTES_PER_ACCOUNT,
                    help="reply bytes queued for a client account before its reading pauses")
parser.add_argument("--max-inflight-per-system-cap", type=int,
                    default=accounts.SYSTEM_MAX_INFLIGHT_PER_CAP,
                    help="requests in flight on one capability of the system account (daemons)")
args = parser.parse_args()
for value in (args.max_caps_per_account, args.max_inflight_per_account, args.max_inflight_per_cap,
              args.max_queued_bytes_per_account, args.max_inflight_per_system_cap):
    if value < 1:
        parser.error("limits must be positive")
logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="kernel[%(process)d] %(levelname)s %(message)s")
raise_fd_limit()
client_limits = Limits(max_caps=args.max_caps_per_account, max_inflight=args.max_inflight_per_account,
                       max_inflight_per_cap=args.max_inflight_per_cap,
                       max_queued_bytes=args.max_queued_bytes_per_account)
system_limits = Limits(max_caps=None, max_inflight=None,
                       max_inflight_per_cap=args.max_inflight_per_system_cap, max_queued_bytes=None)
trio.run(serve, args.kernel_fd, args.verbose, client_limits, system_limits)

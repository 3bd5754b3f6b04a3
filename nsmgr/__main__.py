"""`python -m redoxcap.nsmgr --channel-fd N [--kernel-fd K]`: serve namespaces on a scheme channel."""

from redoxcap.nsmgr.namespace import NamespaceScheme
from redoxcap.schemes.framework import daemon_cli


def _options(parser):
    parser.add_argument("--kernel-fd", type=int, default=None,
                        help="a kernel capability, to create schemes for namespaces with SCHEME_CREATE")


daemon_cli("nsmgr", lambda args: NamespaceScheme(args.kernel_fd), _options)

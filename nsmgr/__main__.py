"""`python -m nsmgr --channel-fd N`: serve namespaces on a scheme channel from the router."""

import argparse

from nsmgr.namespace import NamespaceScheme
from schemes.framework import daemon_main

parser = argparse.ArgumentParser(prog="python -m nsmgr", description=__doc__)
parser.add_argument("--channel-fd", type=int, required=True,
                    help="inherited scheme channel (from the router's SCHEME_CREATE)")
args = parser.parse_args()
daemon_main(NamespaceScheme(), args.channel_fd)

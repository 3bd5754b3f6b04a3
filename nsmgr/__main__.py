"""`python -m nsmgr --channel-fd N`: serve namespaces on a scheme channel from the router."""

from nsmgr.namespace import NamespaceScheme
from schemes.framework import daemon_cli

daemon_cli("nsmgr", lambda args: NamespaceScheme())

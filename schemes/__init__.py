"""Scheme daemons: the framework (schemes/framework.py) and one module per scheme."""

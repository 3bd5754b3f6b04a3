"""The namespace manager process (`python -m nsmgr`); see nsmgr/namespace.py."""

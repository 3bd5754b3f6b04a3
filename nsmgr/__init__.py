"""The namespace manager process (`python -m redoxcap.nsmgr`); see nsmgr/namespace.py."""

"""The kernel router process (`python -m redoxcap.kernel`); see kernel/router.py."""

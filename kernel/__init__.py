"""The kernel router process (`python -m kernel`); see kernel/router.py."""

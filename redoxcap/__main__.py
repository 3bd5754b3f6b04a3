"""`python -m redoxcap` is the `redoxcap` command."""

from redoxcap.cli import main

main(prog_name="redoxcap")

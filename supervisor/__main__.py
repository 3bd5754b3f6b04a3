"""`python -m supervisor` is the `redoxcap` command."""

from supervisor.cli import main

main(prog_name="redoxcap")

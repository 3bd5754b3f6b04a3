"""`python -m redoxcap` is the `redoxcap` command."""

from redoxcap.entry import main

main()

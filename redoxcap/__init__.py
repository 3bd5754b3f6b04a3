"""The supervisor: the `redoxcap` command, booting and watching the system."""

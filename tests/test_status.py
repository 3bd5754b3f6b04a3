"""`status` and `graph`: what runs, who holds which capabilities, and what they name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from redoxcap.testing import REDOXCAP, booted, spare_prepared, wait_for

HOLDER = ("import rt, sys\n"
          "f = rt.open('held.txt', rt.O_CREAT | rt.O_WRONLY)\n"
          "z = rt.open('/scheme/zero')\n"
          "print('holding', flush=True)\n"
          "sys.stdin.read()\n")


def test_status_and_graph_show_mounts_clients_and_what_they_hold(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    with booted(tmp_path, "--mount", f"photos={photos}:ro") as system:
        holder = None
        try:
            (system.root / "box").mkdir()
            holder = subprocess.Popen([*REDOXCAP, "--state-dir", str(system.state_dir), "run",
                                       "--ns", "file,zero", "--cwd", "/box", "--",
                                       sys.executable, "-c", HOLDER],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline() == "holding\n"
            info = system.status()
            assert info["mounts"] == {"photos": {"path": str(photos), "read_only": True}}
            client = wait_for(lambda: next((c for c in system.status()["clients"]
                                            if c["argv"][:2] == [sys.executable, "-c"]), None))
            assert (client["names"], client["cwd"]) == ("file,zero", "/box")
            assert client["capabilities"] >= 4  # namespace, cwd, the file, zero

            table = system.cli("status").stdout
            assert f"mount photos: {photos} (read-only)" in table
            assert any(line.split()[:1] == [str(client["pid"])] and "file,zero" in line
                       for line in table.splitlines())

            dot = system.cli("graph").stdout
            assert dot.startswith("digraph capabilities {")
            node = f"client{client['pid']}"
            assert f"{node} [" in dot and "namespace: file,zero" in dot
            assert "/scheme/file/box/held.txt" in dot  # the handle behind its capability
            assert "namespace: file, zero" in dot  # the names of its namespace handle
            assert f"{node} -> h" in dot

            # the spare runner's namespace for the next run, made ahead, is its own
            spare = spare_prepared(system)
            assert spare["capabilities"] > 0
            assert f"the spare holds {spare['capabilities']} capabilities for the next run" in \
                system.cli("status").stdout
            dot = system.cli("graph").stdout
            assert "spare [" in dot and "spare -> h" in dot
            assert f"account{spare['account']}" not in dot

            out = tmp_path / "graph.svg"
            rendered = system.cli("graph", "--output", str(out), check=False)
            if shutil.which("dot"):
                assert rendered.returncode == 0 and out.read_text().lstrip().startswith(("<?xml", "<svg"))
            else:  # no Graphviz here: a readable error, not a traceback
                assert rendered.returncode == 1 and "Graphviz" in rendered.stderr
        finally:
            if holder is not None:
                holder.stdin.close()
                holder.wait(timeout=60)
                holder.stdout.close()
    assert json.dumps(info)  # the status reply is plain JSON


def test_status_shows_a_run_whose_command_line_is_too_long_to_show_whole(tmp_path):
    # a control request is at most 4 KiB: the note of this run shows its command cut, not
    # nothing (an unmodified program, started from the spare's prepared steps)
    word = "x" * 5000
    with booted(tmp_path) as system:
        waiting = subprocess.Popen([*REDOXCAP, "--state-dir", str(system.state_dir), "run", "--",
                                    "/bin/sh", "-c", "cat >/dev/null", "sh", word],
                                   stdin=subprocess.PIPE)
        try:
            client = wait_for(lambda: next((c for c in system.status()["clients"]
                                            if c["argv"][:3] == ["/bin/sh", "-c", "cat >/dev/null"]),
                                           None))
            assert client["argv"][3] == "sh"
            assert client["argv"][4].startswith("xxx") and client["argv"][4].endswith("...")
            assert len(client["argv"][4]) < len(word)
        finally:
            waiting.stdin.close()
            assert waiting.wait(timeout=60) == 0


def test_graph_shows_a_name_a_client_chose_without_driving_the_terminal(redoxcap_module_system):
    """A file a client names with escape sequences shows in `graph` (whose DOT goes to the
    operator's terminal by default) escaped, as the log and the trace show client text."""
    name = "evil\x1b]0;owned\x07\x1b[2J.txt"
    holder = redoxcap_module_system.start(
        "run", "--", sys.executable, "-c",
        f"import rt, sys\nf = rt.open({name!r}, rt.O_CREAT | rt.O_WRONLY)\n"
        "print('holding', flush=True)\nsys.stdin.read()\n")
    try:
        assert holder.stdout.readline() == "holding\n"
        dot = redoxcap_module_system.cli("graph").stdout
    finally:
        holder.communicate("", timeout=60)
    assert "evil\\\\x1b]0;owned\\\\x07" in dot
    assert all(line.isprintable() for line in dot.splitlines()), dot

"""bench.py's report: the targets of issue 21 beside each row, the verdicts, the plot."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One row of issue 21's target table: where its ratio is in the results, and its bound."""

    what: str  # the words ({mode}: the mode `redoxcap run` runs in by default)
    bound: float
    at_least: bool  # a throughput to reach; otherwise a latency not to exceed
    unit: str  # " R", "x bubblewrap", "of native", "x" (the throughput of 4 clients) or " ms"
    measured: Callable[[dict], float | None]  # the ratio in a run's results (None: not measured)
    row: tuple[str, str] | None = None  # (part, row) it is shown beside in the part's table

    def show(self, value: float, digits: int = 2) -> str:
        if self.unit == "of native":
            return f"{value:.0%} of native"
        if self.unit == " ms":
            return f"{value:.0f} ms"
        return f"{value:.{digits}f}{self.unit}"

    @property
    def bound_text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.show(self.bound, 0)}"


def _launch_vs_bubblewrap(command: str) -> Callable[[dict], float | None]:
    def ratio(r: dict) -> float | None:
        default = f"redoxcap run ({r['launch']['modes'][0]})"
        return r["launch"]["commands"][command]["ratios"].get(f"{default} / bubblewrap")
    return ratio


TARGETS = [
    Target("routed read 1 B of /scheme/zero through rt", 5, False, " R",
           lambda r: r["rt"]["read 1 B of /scheme/zero"]["/R"], ("rt", "read 1 B of /scheme/zero")),
    Target("routed fstat through rt", 5, False, " R", lambda r: r["rt"]["fstat"]["/R"], ("rt", "fstat")),
    Target("open+close via the namespace", 8, False, " R",
           lambda r: r["rt"]["open+close via the namespace"]["/R"],
           ("rt", "open+close via the namespace")),
    Target("stat via the namespace", 6, False, " R", lambda r: r["rt"]["stat via the namespace"]["/R"],
           ("rt", "stat via the namespace")),
    Target("brokered os.stat of a cwd file", 2, False, " R",
           lambda r: r["broker"]["stat via the cwd"]["/R"], ("broker", "stat via the cwd")),
    Target("brokered open+read 4 KiB+close of a cwd file", 3, False, " R",
           lambda r: r["broker"]["open+read 4 KiB+close via the cwd"]["/R"],
           ("broker", "open+read 4 KiB+close via the cwd")),
    Target("`redoxcap run -- /bin/true` ({mode})", 10, False, "x bubblewrap",
           _launch_vs_bubblewrap("/bin/true")),
    Target("`redoxcap run -- python3 -c pass` ({mode})", 3, False, "x bubblewrap",
           _launch_vs_bubblewrap("python3 -c pass")),
    Target("a private run --dir D -- /bin/true, no system up", 1000,
           False, " ms", lambda r: r["launch"]["private"]["run --dir D -- /bin/true, none up ms"]),
    Target("bulk passthrough read 64 MiB", 0.9, True, "of native",
           lambda r: r["bulk"]["read passthrough"]["of native"], ("bulk", "read passthrough")),
    Target("bulk passthrough write 64 MiB", 0.9, True, "of native",
           lambda r: r["bulk"]["write passthrough"]["of native"], ("bulk", "write passthrough")),
    Target("{clients} clients vs 4", 1, True, "x",
           lambda r: r["scaling"]["most vs 4"]["ratio"]),
]


def verdicts(r: dict) -> list[dict]:
    """Each target's row: what, the measured ratio, the bound, and whether it is met (None: open)."""
    out = []
    for target in TARGETS:
        value = target.measured(r)
        met = None if value is None else (value >= target.bound if target.at_least
                                          else value <= target.bound)
        what = target.what.format(mode=r["launch"]["modes"][0],
                                  clients=r["scaling"]["most vs 4"]["clients"])
        out.append({"what": what, "measured": value, "shown": "" if value is None else target.show(value),
                    "target": target.bound_text, "met": met})
    return out


def target_beside(part: str, row: str) -> str:
    """The target shown beside a row of a part's table ('' for none)."""
    for target in TARGETS:
        if target.row == (part, row):
            return target.bound_text
    return ""


# -- report ------------------------------------------------------------------------


def report(r: dict) -> None:
    R, Rp = r["floors"]["R cross-core µs"], r["floors"]["R pinned µs"]
    nat = r["floors"]["native open+read 4 KiB+close µs"]
    print(f"floors: R cross-core {R:.1f} µs, R pinned {Rp:.1f} µs, "
          f"native open+read 4 KiB+close {nat:.1f} µs")
    print("(/R: per chunk of calls, its median call over the median R pinged just before and after"
          " it; the median over chunks)")
    print(f"\n{'rt call':<40} {'µs':>9} {'R µs':>6} {'/R':>6}  target")
    for name, t in r["rt"].items():
        print(f"{name:<40} {t['µs']:>9.1f} {t['R µs']:>6.1f} {t['/R']:>6.2f}  {target_beside('rt', name)}")
    kept, unkept = r["keep"].values()
    print(f"\nkeeping handles across restarts: open+close {kept:.1f} µs kept, {unkept:.1f} µs "
          f"not kept ({kept / unkept:.2f}x)")
    print(f"\n{'read/write':<40} {'µs':>9} {'/R':>6} {'/native':>8}")
    for name, us in r["io"].items():
        base = r["io"][name.rsplit(" ", 1)[0] + " native"]
        target = "<= 1.5" if name.endswith("4 KiB passthrough") else ""
        print(f"{name:<40} {us:>9.1f} {us / R:>6.2f} {us / base:>8.2f} {target}")
    print(f"\n{'bulk (1 MiB calls on an open fd)':<40} {'MiB/s':>9} {'of native':>10}  target")
    for name, t in r["bulk"].items():
        row = f"{name} {t['MiB']:.0f} MiB"
        print(f"{row:<40} {t['MiB/s']:>9.0f} {t['of native']:>9.0%}   {target_beside('bulk', name)}")
    print(f"\n{'brokered call (unmodified python3, run)':<40} {'µs':>9} {'R µs':>6} {'/R':>6}  target")
    for name, t in r["broker"].items():
        target = target_beside("broker", name) or ("<= 6 R" if name == "open+close via the namespace" else "")
        print(f"{name:<40} {t['µs']:>9.1f} {t['R µs']:>6.1f} {t['/R']:>6.2f}  {target}")
    print(f"\n{'whole program (brokered in-process)':<40} {'native ms':>10} {'brokered ms':>12} {'ratio':>6}")
    for name, t in r["programs"].items():
        print(f"{name:<40} {t['native ms']:>10.1f} {t['brokered ms']:>12.1f} {t['ratio']:>6.1f}")
    launch = r["launch"]
    print(f"\nlaunches, system up, whole processes, {r['launch rounds']} round(s) taking turns; "
          f"bubblewrap: {launch['bubblewrap']}")
    has_bwrap = any("bubblewrap" in t["ms"] for t in launch["commands"].values())
    print(f"{'':<48} {'ms':>8} {'/native':>8}" + (f" {'/bwrap':>8}" if has_bwrap else ""))
    for command, t in launch["commands"].items():
        print(command)
        for who, ms in t["ms"].items():
            line = f"  {who:<46} {ms:>8.1f} {t['ratios'].get(f'{who} / native', 1.0):>8.1f}"
            if has_bwrap and (vs := t["ratios"].get(f"{who} / bubblewrap")) is not None:
                line += f" {vs:>8.1f}"
            print(line)
    print("a private system, no system up (whole processes, median ms)")
    for what, ms in launch["private"].items():
        print(f"  {what.removesuffix(' ms'):<46} {ms:>8.1f}")
    print(f"\n{'clients':<10} {'ops/s':>10} {'p99 µs':>10}   (openat+read 4 KiB+close via the cwd)")
    for count, s in r["scaling"]["clients"].items():
        print(f"{count:<10} {s['ops/s']:>10.0f} {s['p99 µs']:>10.0f}")
    most = r["scaling"]["most vs 4"]
    print(f"{most['clients']} clients vs 4: {most['ratio']:.2f}x the throughput "
          f"(median of {most['rounds']} rounds; target: >= 1)")
    print()
    for name, kib in r["memory"].items():
        print(f"{name}: {kib:.2f}" + ("   (target: router <= 4)" if name.startswith("kernel") else ""))
    print(f"\n{'issue 21 target':<58} {'measured':>18} {'target':>20}")
    for row in r["targets"]:
        verdict = {True: "met", False: "MISSED", None: "open"}[row["met"]]
        shown = row["shown"] or "no bubblewrap"
        print(f"{row['what']:<58} {shown:>18} {row['target']:>20}  {verdict}")


def plot(scale: dict[int, dict[str, float]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot)", file=sys.stderr)
        return
    counts = list(scale)
    fig, ax = plt.subplots()
    ax.plot(counts, [scale[c]["ops/s"] for c in counts], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("client processes")
    ax.set_ylabel("ops/s (openat+read+close)")
    fig.savefig(path)

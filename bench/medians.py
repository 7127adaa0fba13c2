"""The medians of the last few ``make bench`` runs, and the data path's targets against them.

``make bench RUNS=3`` runs bench/run.py three times and then this. On a small machine one run's
figures move by 10 % or more from the next (the same build, nothing else running), and the peers'
move as much: a target is judged on medians, each comparison taken within a run first (RouterPanel's
added latency is its own run's figure minus its own run's DIRECT, a ratio is taken inside its run),
then the median over the runs. Usage: ``python bench/medians.py N`` (the N newest results in
bench/results/ that were made with the same options as the newest).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("floor", "vllm-router", "sglang-router", "RouterPanel")
Run = dict[str, dict]  # system name -> its figures (bench/peers.py's Figures, as JSON)


def latest(count: int) -> list[dict]:
    """The ``count`` newest reports made with the options of the newest (oldest first)."""
    reports = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("bench-*.json"))]
    if not reports:
        raise SystemExit("no results in bench/results: run make bench first")

    def options(report: dict) -> tuple:
        return report.get("server"), report.get("workers"), report.get("peers"), report.get("pd") is not None

    newest = options(reports[-1])
    same = [report for report in reports if options(report) == newest]
    return same[-count:]


def median_of(runs: list[Run], system: str, figure: Callable[[dict, dict], float | None]) -> tuple[float, list[float]]:
    """The median over runs of ``figure(system's figures, DIRECT's figures)``, and each run's value."""
    values = []
    for run in runs:
        if system in run:
            value = figure(run[system], run["direct"])
            if value is not None:
                values.append(value)
    return (statistics.median(values) if values else float("nan")), values


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    reports = latest(count)
    runs: list[Run] = [{row["system"]: row for row in report["systems"]} for report in reports]
    loads = ", ".join(" ".join(f"{x:.2f}" for x in report["load"]) for report in reports)
    print(f"medians of {len(runs)} run(s) (load averages at their ends: {loads})")
    columns: dict[str, Callable[[dict, dict], float | None]] = {
        "CPU us/req (c32)": lambda s, d: s["cpu_us_c32"],
        "added p50 us (c1)": lambda s, d: (s["latency_p50"] - d["latency_p50"]) * 1e6,
        "req/s c32 (x direct)": lambda s, d: s["rps_c32"] / d["rps_c32"],
        "chunks/s (x direct)": lambda s, d: s["chunks_per_s"] / d["chunks_per_s"],
        "first event added p50 ms": lambda s, d: (s["first_event_p50"] - d["first_event_p50"]) * 1e3,
        "first event p99 (x direct p99)": lambda s, d: s["first_event_p99"] / d["first_event_p99"],
        "RSS MB": lambda s, d: s["rss_mb"],
    }
    print()
    print("| system | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    medians: dict[tuple[str, str], tuple[float, list[float]]] = {}
    for system in SYSTEMS:
        if not any(system in run for run in runs):
            continue
        cells = []
        for name, figure in columns.items():
            medians[system, name] = found = median_of(runs, system, figure)
            value, values = found
            cells.append("" if not values else f"{value:,.3g} ({' / '.join(f'{v:,.3g}' for v in values)})")
        print(f"| {system} | " + " | ".join(cells) + " |")
    pd = [_pd_ratio(report["pd"]) for report in reports if report.get("pd")]

    def verdict(
        name: str, value: float, bound: float, per_run: list[float], *, at_least: bool = False, unit: str = "runs"
    ) -> None:
        met = value >= bound if at_least else value <= bound
        sign = ">=" if at_least else "<="
        runs_met = sum((v >= bound if at_least else v <= bound) for v in per_run)
        outcome = "met" if met else "NOT met"
        print(f"- {name}: {value:,.3g} {sign} {bound:,.3g}: {outcome} (in {runs_met} of {len(per_run)} {unit})")

    print("\ntargets, on the medians:")
    ours = {name: medians[("RouterPanel", name)] for name in columns}
    # The two comparisons with a peer: on the head-to-head rounds when the runs have them (bench/peers.py:
    # each difference taken seconds apart, every round of every run), else on each run's phases
    # (minutes apart, which the machine's drift can decide).
    duels = [report["head_to_head"] for report in reports if report.get("head_to_head")]
    for peer, column, field, scale, what, bound in (
        ("sglang-router", "CPU us/req (c32)", "cpu_us_c32", 1, "CPU per request at c32", 0),
        ("vllm-router", "added p50 us (c1)", "added_p50", 1e6, "added p50 at c1", 50),
    ):
        label = f"{what} minus {peer}'s, us"
        per_round = [
            (ours_value - theirs) * scale
            for duel in duels
            if peer in duel
            for ours_value, theirs in zip(duel["RouterPanel"][field], duel[peer][field], strict=True)
        ]
        if per_round:
            verdict(f"{label}, head to head", statistics.median(per_round), bound, per_round, unit="rounds")
        elif (peer, column) in medians:
            theirs_per_run = medians[peer, column][1]
            per_run = [ours_value - theirs for ours_value, theirs in zip(ours[column][1], theirs_per_run, strict=True)]
            verdict(label, statistics.median(per_run), bound, per_run)
    added, per_run = ours["first event added p50 ms"]
    verdict("first event added p50, ms", added, 0.3, per_run)
    tail, per_run = ours["first event p99 (x direct p99)"]
    verdict("first event p99, x DIRECT's p99", tail, 2.0, per_run)
    chunks, per_run = ours["chunks/s (x direct)"]
    verdict("stream chunks/s, x DIRECT", chunks, 0.65, per_run, at_least=True)
    rss, per_run = ours["RSS MB"]
    verdict("peak RSS of the web worker, MB", rss, 100, per_run)
    if pd:
        verdict("PD CPU per request, x hybrid", statistics.median(pd), 1.6, pd)
    split = [pair for report in reports if report.get("pd") and (pair := _pd_split(report["pd"])) is not None]
    if split:
        user, kernel = [pair[0] for pair in split], [pair[1] for pair in split]
        print(f"  of which user space {statistics.median(user):.2f}x ({' / '.join(f'{v:.2f}' for v in user)}),")
        print(f"  the kernel {statistics.median(kernel):.2f}x ({' / '.join(f'{v:.2f}' for v in kernel)})")
    return 0


def _pd_ratio(pd: dict) -> float:
    """A run's PD ratio: the median over its alternated rounds (bench/pd.py), or, in a report made
    before the rounds, its one PD run over the mean hybrid figure."""
    return pd["ratio"] if "ratio" in pd else pd["cpu_us"] / pd["hybrid_cpu_us"]


def _pd_split(pd: dict) -> tuple[float, float] | None:
    """(user-space ratio, kernel ratio) of a run's PD figure, when it has them."""
    if "user_ratio" in pd:
        return pd["user_ratio"], pd["kernel_ratio"]
    if "kernel_us" in pd:
        user = (pd["cpu_us"] - pd["kernel_us"]) / (pd["hybrid_cpu_us"] - pd["hybrid_kernel_us"])
        return user, pd["kernel_us"] / pd["hybrid_kernel_us"]
    return None


if __name__ == "__main__":
    sys.exit(main())

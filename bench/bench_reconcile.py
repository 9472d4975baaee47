"""Benchmark: `cli.py reconcile` against bare DuckDB and pandas on the same Parquet bundle.

Each contender runs as its own process (so each pays interpreter start-up and imports) and its
peak RSS is read from the kernel (wait4 rusage). Rounds interleave the contenders; prints
best-of-N seconds, peak RSS, and the ratios against the targets: <= 2.0x bare DuckDB, >= 10x
faster than pandas.

    python bench/bench_reconcile.py [--events 10000000] [--accounts 10000] [--repeat 3] [--skip-pandas]
                                    [--billing calendar|anniversary]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one run of `command`."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode() if process.stderr else ''}")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--billing", choices=("calendar", "anniversary"), default="calendar",
                        help="anniversary: periods start at each account's own second of the month (Stripe's default)")
    args = parser.parse_args()
    suffix = "" if args.billing == "calendar" else f"-{args.billing}"
    bundle = BENCH / "out" / f"bundle-{args.events}-{args.accounts}{suffix}"
    if not (bundle / "reported_usage.parquet").exists():
        print(f"generating {args.events:,} events for {args.accounts:,} accounts in {bundle} ...", flush=True)
        subprocess.run([sys.executable, str(BENCH / "gen_large.py"), str(bundle), "--events", str(args.events),
                        "--accounts", str(args.accounts), "--billing", args.billing], check=True)
    contenders = {
        "cli.py reconcile": [sys.executable, "cli.py", "reconcile", str(bundle), "--output",
                             str(bundle.parent / "anomalies.csv")],
        "bare DuckDB": [sys.executable, str(BENCH / "bare_duckdb.py"), str(bundle)],
    }
    if not args.skip_pandas:
        contenders["pandas"] = [sys.executable, str(BENCH / "pandas_baseline.py"), str(bundle)]
    # Rounds interleave the contenders so that a busy moment on the machine hits all of them alike.
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for round_ in range(args.repeat):
        for name, command in contenders.items():
            if name != "pandas" or round_ == 0:
                runs[name].append(measure(command))
    results = {name: (min(r[0] for r in done), max(r[1] for r in done)) for name, done in runs.items()}
    print(f"\n{args.events:,} events, {args.accounts:,} accounts, {args.billing} billing, best of {args.repeat}:")
    print(f"{'contender':<18}{'seconds':>10}{'peak RSS MiB':>15}")
    for name, (seconds, rss) in results.items():
        print(f"{name:<18}{seconds:>10.2f}{rss:>15.0f}")
    product, bare = results["cli.py reconcile"][0], results["bare DuckDB"][0]
    print(f"\ncli / bare DuckDB: {product / bare:.2f}x (target <= 2.0x)")
    if "pandas" in results:
        print(f"pandas / cli: {results['pandas'][0] / product:.1f}x faster (target >= 10x)")
    print(f"cli peak RSS: {results['cli.py reconcile'][1] / 1024:.2f} GiB (target for 100M events: <= 4 GiB)")


if __name__ == "__main__":
    main()

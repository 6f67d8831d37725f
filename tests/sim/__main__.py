"""Run membership simulator schedules: ``python -m tests.sim --schedules 1000000`` (a soak,
on every core), or ``python -m tests.sim --seed S --trace`` to replay one schedule.

Prints each failing seed with the command that replays it; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
import traceback

from tests.sim.world import Violation, run_schedule


def _run(seed: int) -> str | None:
    try:
        run_schedule(seed)
    except Violation as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - a crash of the protocol is a failure of this seed
        return (f"crash:\n{traceback.format_exc()}\nreplay: python -m tests.sim --seed {seed} "
                f"--trace")
    return None


def _batch(args: tuple[int, int]) -> list[tuple[int, str]]:
    start, count = args
    failures = []
    for seed in range(start, start + count):
        failure = _run(seed)
        if failure is not None:
            failures.append((seed, failure))
    return failures


def run_many(first: int, schedules: int, workers: int, stop_at_first: bool = False
             ) -> list[tuple[int, str]]:
    """Run seeds first .. first+schedules-1 on ``workers`` processes; the failures."""
    chunk = 50
    tasks = [(s, min(chunk, first + schedules - s))
             for s in range(first, first + schedules, chunk)]
    failures: list[tuple[int, str]] = []
    if workers <= 1:
        results = map(_batch, tasks)
        for found in results:
            failures += found
            if found and stop_at_first:
                break
        return failures
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for found in pool.imap(_batch, tasks):
            failures += found
            if found and stop_at_first:
                pool.terminate()
                break
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seed", type=int, help="replay this one schedule")
    parser.add_argument("--trace", action="store_true", help="print every event (with --seed)")
    parser.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--schedules", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--stop-at-first", action="store_true",
                        help="stop at the first failing seed (how long does it take?)")
    args = parser.parse_args()
    if args.seed is not None:
        if args.trace:
            logging.basicConfig(level=logging.INFO, format="         %(message)s")
        failure = _run(args.seed) if not args.trace else None
        if args.trace:
            try:
                run_schedule(args.seed, trace=True)
            except Violation as exc:
                failure = str(exc)
        print(failure or f"seed {args.seed}: every invariant held")
        return 1 if failure else 0
    started = time.monotonic()
    failures = run_many(args.first, args.schedules, args.workers, args.stop_at_first)
    elapsed = time.monotonic() - started
    for seed, failure in failures[:20]:
        print(f"--- seed {seed}\n{failure}\n")
    if failures:
        print("failed seeds:", " ".join(str(seed) for seed, _ in failures))
    print(f"{args.schedules} schedules, {len(failures)} failed, {elapsed:.1f} s "
          f"({args.workers} workers)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

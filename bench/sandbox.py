"""
Benchmark the code sandbox (nanochat.execution): wall time per call of execute_code and judge_function at each
isolation level available here, on a trivial program and on a HumanEval-sized one.

    python -m bench.sandbox              # about 10 s
    python -m bench.sandbox --calls 50

Prints the median and p90 seconds per call; "bwrap" is skipped (with a line saying why) where bubblewrap is not
usable.
"""

import argparse
import statistics
import time

from nanochat.execution import bwrap_status, execute_code, judge_function

CONTEXT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
CANDIDATE = "def add(a, b):\n    return a + b\n"
TESTS = "def check(candidate):\n" + "".join(f"    assert candidate({i}, {i}) == {2 * i}\n" for i in range(20)) + \
        "check(add)\n"


def time_calls(fn, calls):
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if not result.success:
            raise RuntimeError(f"benchmark call failed: {result}")
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def main(argv=None):
    parser = argparse.ArgumentParser(description="code sandbox benchmark")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per case")
    args = parser.parse_args(argv)
    bwrap, reason = bwrap_status()
    levels = ["bwrap", "guard"] if bwrap is not None else ["guard"]
    if bwrap is None:
        print(f"bwrap: skipped ({reason})")
    for level in levels:
        cases = {
            "execute_code print": lambda: execute_code("print(1)", isolation=level),
            "execute_code program+tests": lambda: execute_code(CONTEXT + CANDIDATE + TESTS, isolation=level),
            "judge_function 20 calls": lambda: judge_function(CANDIDATE, "add", TESTS, CONTEXT, isolation=level),
        }
        for name, fn in cases.items():
            fn()  # warm-up (the first bwrap call also probes bwrap)
            median, p90 = time_calls(fn, args.calls)
            print(f"{level:6s} {name:28s} median {median:.3f}s  p90 {p90:.3f}s  ({args.calls} calls)")


if __name__ == "__main__":
    main()

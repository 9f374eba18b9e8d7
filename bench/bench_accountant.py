"""Times the accountant's two hot paths (targets: epsilon of a two-mechanism history under
50 ms, one calibration under 1 s). Run: .venv/bin/python bench/bench_accountant.py"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from accountant import calibrate_sigma, epsilon  # noqa: E402

CENTRAL, DPSGD = (0.1, 5.0, 5), (1 / 15, 13.1, 2250)  # DP-FETA on MNIST


def best_of(repeats, function):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times), sorted(times)[len(times) // 2]


if __name__ == "__main__":
    fastest, median = best_of(20, lambda: epsilon([CENTRAL, DPSGD], 1e-5))
    print(f"epsilon, two mechanisms: best {fastest * 1e3:.1f} ms, median {median * 1e3:.1f} ms (limit 50 ms)")
    for target in (1.0, 10.0):
        fastest, median = best_of(5, lambda: calibrate_sigma(target, 1e-5, 1 / 15, 2250, [CENTRAL]))
        print(f"calibration at eps={target:g}: best {fastest * 1e3:.0f} ms, "
              f"median {median * 1e3:.0f} ms (limit 1 s)")

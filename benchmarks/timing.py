"""The timing rule every benchmark here uses: one warm-up call (compilation, tracing), then the best
of ``repeats`` wall-clock runs. ``fn`` must block until its result is ready."""

import time


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best

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


def interleaved_times(fns: dict, rounds: int) -> dict:
    """``{name: [seconds of each round]}``: one warm-up call of each function, then ``rounds`` rounds
    that call each once in turn (A, B, A, B, ...), so that a change of the machine's load falls on all
    of them alike. Compare them by the per-round ratios (:func:`ratio_summary`)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_summary(numerator, denominator) -> tuple:
    """(median, smallest, largest) of the per-round ratios of two :func:`interleaved_times` lists."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])
    return median, ratios[0], ratios[-1]

"""The probes' one timer: the median of `repeats` calls after three warm-up calls, in milliseconds."""
import statistics
import time


def median_ms(run, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3

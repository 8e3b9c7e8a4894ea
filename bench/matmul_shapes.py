"""Matrix-product throughput by row count on this CPU (why `cpu` batches 320 rows): F.linear of an
[m, 896] batch against Qwen2.5-0.5B's MLP (4864 x 896) and LM-head (151936 x 896) weight shapes,
float32, median of 5 after 2 warm-ups.

    .venv/bin/python bench/matmul_shapes.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

WIDTH = 896
SHAPES = {"MLP up/gate": 4864, "LM head": 151936}
ROWS = {"MLP up/gate": (64, 128, 256, 320, 3328), "LM head": (64, 128, 320)}


def seconds(fn, warmup: int = 2, reps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, out_features in SHAPES.items():
        weight = torch.randn(out_features, WIDTH)
        for m in ROWS[name]:
            x = torch.randn(m, WIDTH)
            t = seconds(lambda: F.linear(x, weight))
            print(f"{name:12s} {m:5d} x {WIDTH} x {out_features}: {t * 1e3:8.1f} ms  "
                  f"{2 * m * WIDTH * out_features / t / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()

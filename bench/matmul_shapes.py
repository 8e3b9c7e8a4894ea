"""Matrix-product throughput by row count on this CPU (why cpu batches 320 rows): F.linear of an
[m, 896] batch against Qwen2.5-0.5B weight shapes, median of 5 after 2 warm-ups.

    .venv/bin/python bench/matmul_shapes.py
"""
import torch, time
def bench(f, flops):
    for _ in range(2): f()
    ts=[]
    for _ in range(5):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    t=sorted(ts)[2]; return f"{t*1e3:.1f} ms {flops/t/1e9:.1f} GF/s"
for m,k,n in [(64,896,4864),(128,896,4864),(256,896,4864),(64,896,151936),(128,896,151936)]:
    a=torch.randn(m,k); w=torch.randn(n,k); wt=w.t().contiguous()
    fl=2*m*k*n
    print(m,k,n, "linear", bench(lambda: torch.nn.functional.linear(a,w), fl),
          "| a@wt", bench(lambda: a@wt, fl),
          "| wa^T", bench(lambda: (w@a.t()), fl))

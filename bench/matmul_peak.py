"""The machine's float32 matmul peak as torch reaches it: the denominator of "achieved FLOP/s" (issue 9).

    python bench/matmul_peak.py [--threads 2] [--sizes 1024,2048,3072] [--repeat 10]

For each size n: ``C = A @ B`` with (n, n) float32 matrices (``torch.mm(..., out=C)``, so no
allocation is timed), two warm-up products, then ``--repeat`` timed ones; one product is
``2 n^3`` FLOPs (:func:`product_rates`, which bench/gpu_check.py runs on a GPU in bf16 too). The peak is the best single product over all sizes (a best-of, like a peak should
be: the noise of a shared machine only ever makes a product slower). Prints one JSON object.
Runs in a process of its own so ``torch.set_num_threads`` is the only thread setting in force.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def product_rates(n: int, repeat: int, *, device: str = "cpu", dtype: str = "float32", products: int = 1,
                  warmup: int = 2) -> list[float]:
    """FLOP/s of ``repeat`` timed rounds of ``products`` back-to-back ``(n, n) @ (n, n)`` products
    (``torch.mm(..., out=C)``: no allocation timed) on ``device`` in ``dtype``, after ``warmup``
    products. On CUDA each round is timed between synchronizations, so several products per round
    keep the launch and sync out of the rate; one product is ``2 n^3`` FLOPs."""
    import torch

    dev, dt = torch.device(device), getattr(torch, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    c = torch.empty(n, n, device=dev, dtype=dt)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        for _ in range(products):
            torch.mm(a, b, out=c)
        sync()
        rates.append(products * 2.0 * n**3 / (time.perf_counter() - t0))
    return rates


def measure(threads: int, sizes: list[int], repeat: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    per_size = {}
    for n in sizes:
        rates = product_rates(n, repeat)
        flops = 2.0 * n**3
        per_size[str(n)] = {"best_flops": max(rates), "median_flops": statistics.median(rates),
                            "best_s": flops / max(rates), "repeat": repeat}
    best = max(v["best_flops"] for v in per_size.values())
    return {"threads": threads, "torch": torch.__version__, "peak_flops": best, "sizes": per_size,
            "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="1024,2048,3072", help="comma-separated matrix sizes n (n x n @ n x n)")
    p.add_argument("--repeat", type=int, default=10)
    ns = p.parse_args()
    print(json.dumps(measure(ns.threads, [int(s) for s in ns.sizes.split(",")], ns.repeat)))


if __name__ == "__main__":
    main()

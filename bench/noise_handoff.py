"""What drawing noise on a helper thread costs the model's thread: per-step hand-offs against one per sample.

    OMP_NUM_THREADS=1 python bench/noise_handoff.py

Times k calls of the overhead benchmark's small MLP (`overhead.MLP`, batch 1000, 64-d) with the noise of each step drawn: not at
all, inline, submitted to a helper thread one step ahead, or as one bank for all steps at the start; best of
`--repeats`, milliseconds per step. Also the model's time per call while another thread draws without pause.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from overhead import MLP   # bench/ is on the path when this script runs

from s3search.noise import _row_filler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net, x = MLP(64, 256, 3).eval(), torch.randn(args.batch, 64)
    t_model = torch.full((args.batch,), 0.5)
    shape, k = (args.batch, 64), args.steps
    pool = ThreadPoolExecutor(1)

    def model() -> torch.Tensor:
        with torch.no_grad():
            return net(x, t_model)

    def per_step(mode: str) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            g = torch.Generator().manual_seed(0)
            t = time.perf_counter()
            if mode == "bank":
                fut, bank = pool.submit(torch.randn, (k,) + shape, generator=g), None
                for i in range(k):
                    model()
                    bank = fut.result().unbind(0) if bank is None else bank
            elif mode == "ahead":
                fut = pool.submit(torch.randn, shape, generator=g)
                for i in range(k):
                    model()
                    fut.result()
                    if i < k - 1:
                        fut = pool.submit(torch.randn, shape, generator=g)
            else:
                for _ in range(k):
                    model()
                    if mode == "inline":
                        torch.randn(shape, generator=g)
            best = min(best, time.perf_counter() - t)
        return best / k * 1e3

    for _ in range(20):
        model()
    print(f"MLP 64-256x3-64, batch {args.batch}, {k} steps, best of {args.repeats}, ms per step")
    print("| noise | run 1 | run 2 |")
    print("|---|---|---|")
    modes = ["none", "inline", "ahead (one hand-off per step)", "bank (one hand-off per sample)"]
    results = {m: [] for m in modes}
    for _ in range(2):   # interleaved, so drift hits every mode alike
        for m in modes:
            results[m].append(per_step(m.split()[0]))
    for m in modes:
        print(f"| {m} | {results[m][0]:.3f} | {results[m][1]:.3f} |")

    stop = threading.Event()

    def draw_forever() -> None:
        g = torch.Generator().manual_seed(1)
        while not stop.is_set():
            torch.randn(shape, generator=g)

    def call_ms(n: int = 200) -> float:
        t = time.perf_counter()
        for _ in range(n):
            model()
        return (time.perf_counter() - t) / n * 1e3

    def rows_forever() -> None:   # what a per-row bank does: one normal_ call from Python per row
        gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        bank = torch.empty((args.batch, k, 64))
        while not stop.is_set():
            for row, g in zip(bank, gens):
                row.normal_(generator=g)

    def compiled_rows_forever() -> None:   # the same fill as s3search.noise does it: compiled, off the GIL
        gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        bank, fill = torch.empty((args.batch, k, 64)), _row_filler()
        while not stop.is_set():
            fill(bank, gens)

    def beside(target) -> float:
        stop.clear()
        th = threading.Thread(target=target)
        th.start()
        try:
            return call_ms()
        finally:
            stop.set()
            th.join()

    print("model call, ms, while another thread does nothing / draws one tensor after another / fills per-row "
          "banks from Python / fills them compiled (s3search.noise)")
    for run in (1, 2):
        print(f"run {run}: {call_ms():.3f} / {beside(draw_forever):.3f} / {beside(rows_forever):.3f} / "
              f"{beside(compiled_rows_forever):.3f}")


if __name__ == "__main__":
    main()

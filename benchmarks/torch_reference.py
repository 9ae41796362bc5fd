# SPDX-License-Identifier: MIT
"""Times the PyTorch eager attention a user would write (materialised scores, bias, mask, softmax,
P·V) on the shapes of posenc_bench_performance, and prints a markdown table with the ratio to the
posenc figures of the same run. Called by benchmarks/report when `import torch` works.

    python3 benchmarks/torch_reference.py TABLE.md [--quick]
    python3 benchmarks/torch_reference.py --backward BACKWARD.md [--quick]

TABLE.md is the table posenc_bench_performance wrote (rows "| encoder | N | threads | GFLOP/s |").
With --backward, BACKWARD.md is posenc_bench_backward's table (rows "| encoder | N | threads |
forward (ms) | backward (ms) | …"), and the script times autograd's backward of the same eager
attention (the forward's graph built untimed, then `out.backward(dout)` timed).
"""
import math
import sys
import time

import torch

HEADS, DIM = 8, 64


def alibi_slopes(heads):
    # Press et al. (2022), power-of-two head counts: m_h = 2^(-8(h+1)/H).
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


def eager_attention(q, k, v, bias):
    n = q.shape[1]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    return scores.softmax(dim=-1) @ v


def alibi_bias(n):
    distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    return -alibi_slopes(HEADS)[:, None, None] * distance.clamp(min=0).float()


def best_seconds(run, reps):
    run()  # warm-up: the caching allocator and the thread pool
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def posenc_rates(table_path):
    rates = {}
    with open(table_path, encoding="utf-8") as table:
        for line in table:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 4 and cells[1].isdigit():
                rates[(cells[0], int(cells[1]), int(cells[2]))] = float(cells[3])
    return rates


def posenc_backward_ms(table_path):
    times = {}
    with open(table_path, encoding="utf-8") as table:
        for line in table:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 5 and cells[1].isdigit():
                times[(cells[0], int(cells[1]), int(cells[2]))] = float(cells[4])
    return times


def backward_table(table_path, quick):
    # N = 8192 would keep about ten H·N² float tensors (≈ 20 GiB) for autograd: 2048 only.
    lengths = [1024] if quick else [2048]
    threads = torch.get_num_threads()
    ours = posenc_backward_ms(table_path)
    print(f"PyTorch {torch.__version__} autograd backward of the eager attention, float32, "
          f"{threads} threads (materialised H·N² scores and probabilities):")
    print()
    print("| encoder | N | PyTorch backward (ms) | posenc backward (ms, same threads) | "
          "PyTorch ÷ posenc |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for n in lengths:
        q, k, v, dout = (torch.randn(HEADS, n, DIM) for _ in range(4))
        for name, bias in (("NoPE", None), ("ALiBi", alibi_bias(n))):
            def step():
                qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
                out = eager_attention(qq, kk, vv, bias)
                start = time.perf_counter()
                out.backward(dout)
                return time.perf_counter() - start

            step()  # warm-up
            seconds = min(step() for _ in range(1 if n > 4096 else 3))
            mine = ours.get((name, n, threads))
            ratio = f"{seconds * 1e3 / mine:.1f}" if mine else "—"
            mine_text = f"{mine:.1f}" if mine else "—"
            print(f"| {name} | {n} | {seconds * 1e3:.1f} | {mine_text} | {ratio} |")


def main():
    if sys.argv[1] == "--backward":
        backward_table(sys.argv[2], "--quick" in sys.argv[3:])
        return
    table_path = sys.argv[1]
    quick = "--quick" in sys.argv[2:]
    lengths = [1024, 2048] if quick else [2048, 8192]
    threads = torch.get_num_threads()
    rates = posenc_rates(table_path)
    print(f"PyTorch {torch.__version__} eager, float32, {threads} threads (materialised H·N² scores):")
    print()
    print("| encoder | N | PyTorch GFLOP/s | posenc GFLOP/s (same threads) | posenc ÷ PyTorch |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for n in lengths:
        q, k, v = (torch.randn(HEADS, n, DIM) for _ in range(3))
        flops = 4.0 * HEADS * DIM * n * (n + 1) / 2  # useful FLOPs: allowed (i, j) pairs only
        for name, bias in (("NoPE", None), ("ALiBi", alibi_bias(n))):
            with torch.no_grad():
                seconds = best_seconds(lambda: eager_attention(q, k, v, bias), 1 if n > 4096 else 3)
            torch_rate = flops / seconds * 1e-9
            ours = rates.get((name, n, threads))
            ratio = f"{ours / torch_rate:.1f}" if ours else "—"
            ours_text = f"{ours:.1f}" if ours else "—"
            print(f"| {name} | {n} | {torch_rate:.1f} | {ours_text} | {ratio} |")


if __name__ == "__main__":
    main()

"""The eval's head loss three ways, on a Gemma-3-sized head (262,144 x 640, bf16) with 2 threads:

- `full`: the head over all rows at once, one float32 cross-entropy over the (rows, 262k) logits (what the eval does);
- `chunk_f32`: 64 rows at a time, float32 log-sum-exp;
- `chunk_bf16`: 64 rows at a time, exp in bf16 with a float32 sum.

    python bench/head_lse.py          # prints tokens/s and the largest difference from `full`, in nats

The chunked bf16 log-sum-exp is kept only if it is faster and agrees to 1e-3 nats.
"""

import time

import torch
import torch.nn.functional as F


def main(rows: int = 512, vocab: int = 262_144, d: int = 640, chunk: int = 64) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    w = (torch.randn(vocab, d) * 0.05).bfloat16()
    h = torch.randn(rows, d).bfloat16() * 2
    t = torch.randint(0, vocab, (rows,))

    def full():
        return F.cross_entropy((h @ w.T).float(), t, reduction="none")

    def chunk_f32():
        out = []
        for i in range(0, rows, chunk):
            logits = (h[i:i + chunk] @ w.T).float()
            out.append(torch.logsumexp(logits, -1) - logits.gather(1, t[i:i + chunk, None])[:, 0])
        return torch.cat(out)

    def chunk_bf16():
        out = []
        for i in range(0, rows, chunk):
            logits = h[i:i + chunk] @ w.T
            top = logits.max(-1, keepdim=True).values
            total = torch.exp(logits - top).sum(-1, dtype=torch.float32)
            out.append(top[:, 0].float() + total.log() - logits.gather(1, t[i:i + chunk, None])[:, 0].float())
        return torch.cat(out)

    reference = full()
    for fn in (full, chunk_f32, chunk_bf16) * 2:
        started = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - started
        print(f"{fn.__name__:10s} {rows / seconds:7.0f} tok/s  max |diff| {float((value - reference).abs().max()):.1e} nats")


if __name__ == "__main__":
    main()

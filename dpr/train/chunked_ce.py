"""Stage 1's history-masked full-softmax cross-entropy, computed in row chunks (CPU).

The specification is :func:`masked_ce_reference`: logits ``h @ table.T`` for every selected position,
``-inf`` at column 0 (padding) and at the items the position has already seen (except its own target),
then the mean cross-entropy. On ML-1M (d=128, windows of 200, batch 512) that is a (56k, 3707) logit
matrix and its gradient; with the (512, 200, 3707) mask stage 1 used to build, 6.4 of a 9.8 s step on the
2-core CPU, almost all of it memory traffic. :class:`ChunkedMaskedCE` computes the same loss and gradients a few hundred rows at a
time (logits recomputed in the backward pass, as in a fused linear + cross-entropy), so every
element-wise pass stays in cache and only the three GEMMs touch the whole problem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_CHUNK_ROWS = 512


def seen_items(x: torch.Tensor, y: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """(M, L) int64: for each selected position (b, t) (``sel``, row-major order, as ``h[sel]``) the items
    of ``x[b, :t + 1]``, with 0 where j > t or where the item is the position's own target (a re-consumed
    item stays learnable). Column 0 is masked anyway, so 0 means "nothing"."""
    b, l = x.shape
    rows, cols = sel.nonzero(as_tuple=True)                      # row-major, as boolean indexing
    hist = x[rows]                                               # (M, L)
    later = torch.arange(l, device=x.device).unsqueeze(0) > cols.unsqueeze(1)
    own = hist == y[rows, cols].unsqueeze(1)
    return hist.masked_fill(later | own, 0)


def masked_logits(h: torch.Tensor, table: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """``h @ table.T`` with -inf at column 0 (padding) and at each row's ``seen`` items (None: none)."""
    lg = h @ table.t()
    if seen is not None:
        lg = lg.scatter(1, seen, float("-inf"))
    lg[:, 0] = float("-inf")
    return lg


def masked_ce_reference(h: torch.Tensor, table: torch.Tensor, target: torch.Tensor,
                        seen: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: the whole (M, N + 1) logit matrix, masked, then ``F.cross_entropy``."""
    return F.cross_entropy(masked_logits(h, table, seen), target)


class ChunkedMaskedCE(torch.autograd.Function):
    """``masked_ce_reference(h, table, target, seen)`` in chunks of ``chunk`` rows; gradients for ``h`` and
    ``table`` (the same values up to float summation order)."""

    @staticmethod
    def forward(ctx, h, table, target, seen, chunk: int):
        m = h.shape[0]
        lse = torch.empty(m, dtype=h.dtype, device=h.device)
        total = h.new_zeros(())
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            lg = masked_logits(h[s:e], table, seen[s:e])
            lse[s:e] = torch.logsumexp(lg, dim=1)
            total += (lse[s:e] - lg.gather(1, target[s:e, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, table, target, seen, lse)
        ctx.chunk = chunk
        return total / max(m, 1)

    @staticmethod
    def backward(ctx, grad):
        h, table, target, seen, lse = ctx.saved_tensors
        m, chunk = h.shape[0], ctx.chunk
        scale = grad / max(m, 1)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dt = torch.zeros_like(table) if ctx.needs_input_grad[1] else None
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            p = masked_logits(h[s:e], table, seen[s:e]).sub_(lse[s:e, None]).exp_()     # softmax; 0 where masked
            p[torch.arange(e - s, device=p.device), target[s:e]] -= 1.0
            p.mul_(scale)
            if dh is not None:
                dh[s:e] = p @ table
            if dt is not None:
                dt.addmm_(p.t(), h[s:e])
        return dh, dt, None, None, None


def masked_ce(h: torch.Tensor, table: torch.Tensor, target: torch.Tensor, seen: torch.Tensor,
              chunk: int = CPU_CHUNK_ROWS) -> torch.Tensor:
    """The mean history-masked cross-entropy (see the module docstring), chunked."""
    if h.shape[0] == 0:
        return masked_ce_reference(h, table, target, seen)
    return ChunkedMaskedCE.apply(h, table, target, seen, int(chunk))

"""Sequential backbones: ``forward(item_seq (B, L) int64, left-padded) -> h (B, d)``.

Every backbone shares the model's item table (input embedding == scoring table) and also exposes
``forward_all`` (hidden state at every position) for next-item training at every position.
A new backbone is one small class registered in ``BACKBONES``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from dpr.config import ModelConfig


class Backbone(nn.Module):
    #: True when leading (left) padding columns can be cut off without changing the output, so a batch of
    #: short histories may be run at its own longest length (SASRec: padded keys are masked and positions
    #: count from the newest item). False for recurrent backbones: padding steps still move their state.
    padding_invariant = False

    def __init__(self, cfg: ModelConfig, item_emb: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        # Stored in a list so the shared table is registered once (by the DPR model), not twice.
        self._item_emb = [item_emb]

    @property
    def item_emb(self) -> nn.Embedding:
        return self._item_emb[0]

    def forward_all(self, item_seq: torch.Tensor) -> torch.Tensor:   # (B, L, d)
        raise NotImplementedError

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:       # (B, d): state at the last position
        return self.forward_all(item_seq)[:, -1]


class _SelfAttentionBlock(nn.Module):
    """Pre-LN causal self-attention + point-wise FFN (SASRec). Written out by hand (no
    nn.MultiheadAttention) so the exported graph is plain MatMul/Softmax that TensorRT parses."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, d)
        self.ff2 = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    # The exported graph is what ONNX Runtime / TensorRT run, so the math is laid out for them: linears on
    # 2-D (rows, d) views (MatMul + bias fuse into one Gemm; 3-D MatMul + Add stay two passes), Q, K and V
    # as three Gemms on slices of the one qkv weight (no Split copy), and with one head no head
    # reshape/transpose at all. Each removed node is a full pass over a (B, L, d) activation: on a
    # 2-core CPU the ONNX Runtime user encoder went from 31 to 26 ms at batch 512. Same math and parameters.
    def _proj(self, h2: torch.Tensor, part: slice) -> torch.Tensor:
        return F.linear(h2, self.qkv.weight[part], self.qkv.bias[part])

    def _heads(self, t: torch.Tensor, b: int, l: int) -> torch.Tensor:
        """(B*L, d) -> (B, H, L, hd)."""
        if self.heads == 1:
            return t.reshape(b, 1, l, -1)
        return t.reshape(b, l, self.heads, -1).transpose(1, 2)

    def _ffn(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.ln2(x2))))))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        hd = d // self.heads
        x2 = x.reshape(b * l, d)
        h = self.ln1(x2)
        q = self._heads(self._proj(h, slice(0, d)), b, l)
        k = self._heads(self._proj(h, slice(d, 2 * d)), b, l)
        v = self._heads(self._proj(h, slice(2 * d, 3 * d)), b, l)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)) + attn_bias   # (B, H, L, L)
        att = self.drop(torch.softmax(att, dim=-1))
        y = att @ v                                                            # (B, H, L, hd)
        y = y.reshape(b * l, d) if self.heads == 1 else y.transpose(1, 2).reshape(b * l, d)
        x2 = self._ffn(x2 + self.drop(self.out(y)))
        return x2.reshape(b, l, d) * keep

    def forward_last(self, x: torch.Tensor, attn_bias_last: torch.Tensor, keep_last: torch.Tensor) -> torch.Tensor:
        """``forward(x, attn_bias, keep)[:, -1]`` without the other rows: keys and values for all L
        positions, but the query, the (B, H, 1, L) attention row, the output projection, the FFN and
        ``keep`` only for the last position. ``attn_bias_last`` (B, 1, 1, L), ``keep_last`` (B, 1) ->
        (B, d). Equal to the full block up to float rounding."""
        b, l, d = x.shape
        hd = d // self.heads
        h = self.ln1(x.reshape(b * l, d))
        k = self._heads(self._proj(h, slice(d, 2 * d)), b, l)
        v = self._heads(self._proj(h, slice(2 * d, 3 * d)), b, l)
        q = self._proj(h.reshape(b, l, d)[:, -1], slice(0, d)).reshape(b, self.heads, 1, hd)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)) + attn_bias_last   # (B, H, 1, L)
        att = self.drop(torch.softmax(att, dim=-1))
        y = (att @ v).reshape(b, d)                     # (B, H, 1, hd): heads in order, as in forward
        return self._ffn(x[:, -1] + self.drop(self.out(y))) * keep_last


class SASRec(Backbone):
    padding_invariant = True

    def __init__(self, cfg: ModelConfig, item_emb: nn.Embedding):
        super().__init__(cfg, item_emb)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_SelfAttentionBlock(cfg.d, cfg.num_heads, cfg.dropout)
                                    for _ in range(cfg.num_blocks))
        self.ln = nn.LayerNorm(cfg.d)

    def _embed(self, item_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input of the first block (B, L, d) and the key mask ``keep`` (B, L, 1)."""
        l = item_seq.shape[1]
        keep = (item_seq > 0).unsqueeze(-1).to(self.item_emb.weight.dtype)       # (B, L, 1)
        # Histories are left-padded, so the newest item always sits at position max_len - 1.
        pos = torch.arange(self.cfg.max_len - l, self.cfg.max_len, device=item_seq.device)
        x = self.item_emb(item_seq) * math.sqrt(self.cfg.d) + self.pos_emb(pos).unsqueeze(0)
        return self.drop(x) * keep, keep

    @staticmethod
    def _masked(dtype: torch.dtype) -> float:
        # A large finite negative (not -inf) keeps rows made only of padding finite; their output is
        # zeroed by `keep` and never read. -1e9 overflows to -inf in float16, so half-precision models
        # (fp16 export) use -1e4.
        return -1e4 if dtype == torch.float16 else -1e9

    def _attn_bias(self, item_seq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive bias (B, 1, L, L): causal and key-padding."""
        l = item_seq.shape[1]
        causal = torch.ones(l, l, dtype=torch.bool, device=item_seq.device).tril()
        allowed = causal.unsqueeze(0) & (item_seq > 0).unsqueeze(1)                # (B, L, L)
        return torch.where(allowed, 0.0, self._masked(dtype)).to(dtype).unsqueeze(1)

    def forward_all(self, item_seq: torch.Tensor) -> torch.Tensor:
        x, keep = self._embed(item_seq)
        attn_bias = self._attn_bias(item_seq, x.dtype)
        for block in self.blocks:
            x = block(x, attn_bias, keep)
        return self.ln(x)

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``forward_all(item_seq)[:, -1]`` (up to float rounding), with the last block computing only
        the last position (the only one read): all earlier blocks need every position, the last one
        only its keys and values."""
        x, keep = self._embed(item_seq)
        n = len(self.blocks)
        if n == 0:
            return self.ln(x[:, -1])
        if n > 1:
            attn_bias = self._attn_bias(item_seq, x.dtype)
            for block in self.blocks[:-1]:
                x = block(x, attn_bias, keep)
        # The causal mask's last row allows every position: only key padding remains.
        bias_last = torch.where(item_seq > 0, 0.0, self._masked(x.dtype)).to(x.dtype)
        bias_last = bias_last.reshape(item_seq.shape[0], 1, 1, item_seq.shape[1])   # (B, 1, 1, L)
        return self.ln(self.blocks[-1].forward_last(x, bias_last, keep[:, -1]))


class GRU4Rec(Backbone):
    def __init__(self, cfg: ModelConfig, item_emb: nn.Embedding):
        super().__init__(cfg, item_emb)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.d, cfg.d, num_layers=cfg.gru_layers, batch_first=True)
        self.proj = nn.Linear(cfg.d, cfg.d)

    @staticmethod
    def _unroll() -> bool:        # export and compile take the unrolled plain-op form (gru_unrolled)
        return torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()

    def _states(self, item_seq: torch.Tensor, last_only: bool) -> torch.Tensor:
        """The GRU's outputs (B, L, d), or only the last step's (B, d)."""
        x = self.drop(self.item_emb(item_seq))
        if self._unroll():
            return gru_unrolled(self.gru, x, last_only=last_only)
        y, _ = self.gru(x)
        return y[:, -1] if last_only else y

    def forward_all(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self._states(item_seq, last_only=False)))

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``forward_all(item_seq)[:, -1]``, projecting only the last step's state."""
        return self.proj(self.drop(self._states(item_seq, last_only=True)))


def gru_unrolled(gru: nn.GRU, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """nn.GRU's math as plain MatMul/Sigmoid/Tanh, unrolled over the (static) sequence length.

    Used for export: the graph then holds only operators every runtime (TensorRT included) supports,
    and the input projections of all steps are one matmul. Tested equal to ``nn.GRU``. Returns every
    step's output of the last layer (B, L, H), or with ``last_only`` only its last step (B, H)."""
    b, l, _ = x.shape
    layer_in = x
    for layer in range(gru.num_layers):
        w_ih = getattr(gru, f"weight_ih_l{layer}")
        w_hh = getattr(gru, f"weight_hh_l{layer}")
        b_ih = getattr(gru, f"bias_ih_l{layer}")
        b_hh = getattr(gru, f"bias_hh_l{layer}")
        hsz = w_hh.shape[1]
        gi_all = layer_in @ w_ih.t() + b_ih                      # (B, L, 3H): r, z, n
        h = layer_in.new_zeros(b, hsz)
        last = last_only and layer == gru.num_layers - 1
        outs = []
        for t in range(l):
            gi = gi_all[:, t]
            gh = h @ w_hh.t() + b_hh
            i_r, i_z, i_n = gi.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            if not last:
                outs.append(h)
        if last:
            return h
        layer_in = torch.stack(outs, dim=1)
    return layer_in


BACKBONES: dict[str, type[Backbone]] = {"sasrec": SASRec, "gru4rec": GRU4Rec}


def build_backbone(cfg: ModelConfig, item_emb: nn.Embedding) -> Backbone:
    try:
        cls = BACKBONES[cfg.backbone]
    except KeyError:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; known: {', '.join(BACKBONES)}") from None
    return cls(cfg, item_emb)

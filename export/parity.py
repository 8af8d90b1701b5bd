"""Parity of an exported graph against the PyTorch model: max abs / max rel error and the top-10 overlap
of retrieval over the item table; the inputs it is measured on (random and real batches, odd sizes) and the
parity run of a whole export (``_parity``: every graph, the fused one with and without the kernel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpr.export.config import ExportConfig
from dpr.export.export_format import (INLINED_SUFFIX, PROMPT_ENCODER, USER_ENCODER, USER_ENCODER_PORTABLE,
                                      USER_INPUTS)
from dpr.export.onnx_graphs import _ort_session


def topk_ids(vectors: np.ndarray, table: np.ndarray, k: int = 10) -> np.ndarray:
    """(B, k) indices (1-based item indices) of the k best items by dot product; row 0 (padding) excluded."""
    scores = vectors.astype(np.float64) @ table[1:].astype(np.float64).T
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return idx + 1


def topk_overlap(a: np.ndarray, b: np.ndarray, table: np.ndarray, k: int = 10) -> float:
    """Mean over rows of |top-k(a) & top-k(b)| / k (1.0 = identical retrieval)."""
    ta, tb = topk_ids(a, table, k), topk_ids(b, table, k)
    kk = ta.shape[1]
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / kk for x, y in zip(ta, tb)]))


def compare(out: np.ndarray, ref: np.ndarray, table: np.ndarray, k: int = 10) -> dict:
    """Errors of ``out`` (exported graph) against ``ref`` (PyTorch): max abs, max rel (per row,
    ``max|out-ref| / max|ref|``), top-k overlap, rows."""
    out = np.asarray(out, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        return {"max_abs": float("inf"), "max_rel": float("inf"), "top10_overlap": 0.0, "rows": int(out.shape[0])}
    diff = np.abs(out - ref)
    denom = np.maximum(np.abs(ref).max(axis=1), 1e-12)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float((diff.max(axis=1) / denom).max()) if diff.size else 0.0,
        "top10_overlap": topk_overlap(out, ref, table, k),
        "rows": int(out.shape[0]),
    }


def merge(results: list[dict]) -> dict:
    """Worst case over several comparisons (overlap: row-weighted mean and minimum)."""
    rows = sum(r["rows"] for r in results)
    return {
        "max_abs": max(r["max_abs"] for r in results),
        "max_rel": max(r["max_rel"] for r in results),
        "top10_overlap": sum(r["top10_overlap"] * r["rows"] for r in results) / max(rows, 1),
        "min_top10_overlap": min(r["top10_overlap"] for r in results),
        "rows": rows,
    }


# ---- parity inputs and the parity run of an export --------------------------------------------------

def _random_user_batch(rng: np.random.Generator, b: int, cfg, full: bool, p_scale: float):
    n, L, d = cfg.num_items, cfg.max_len, cfg.d
    seq = np.zeros((b, L), dtype=np.int64)
    lengths = np.full(b, L) if full else rng.integers(1, max(2, L // 2) + 1, size=b)
    lengths = np.minimum(lengths, L)
    for i, ln in enumerate(lengths):
        seq[i, L - ln:] = rng.integers(1, n + 1, size=ln)
    p_pos = (rng.standard_normal((b, d)) * p_scale).astype(np.float32)
    p_neg = (rng.standard_normal((b, d)) * p_scale).astype(np.float32)
    combos = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.int64)
    presence = combos[(np.arange(b) + rng.integers(0, 4)) % 4]
    # an absent prompt is sent as zeros on half the rows, as random values on the rest
    zero_absent = rng.random(b) < 0.5
    p_pos[(presence[:, 0] == 0) & zero_absent] = 0
    p_neg[(presence[:, 1] == 0) & zero_absent] = 0
    return {"item_seq": seq, "p_pos": p_pos, "p_neg": p_neg, "presence": presence}


def _real_histories(rng: np.random.Generator, catalogue, cfg, b: int) -> np.ndarray:
    """Left-padded histories of real catalogue items: mostly one tag's items (a coherent taste), some mixed."""
    L = cfg.max_len
    seq = np.zeros((b, L), dtype=np.int64)
    tags = catalogue.tag_names
    for i in range(b):
        ln = int(rng.integers(1, L + 1))
        pool = catalogue.items_with_tag(tags[i % len(tags)]) if tags and i % 3 else np.arange(1, cfg.num_items + 1)
        if len(pool) == 0:
            pool = np.arange(1, cfg.num_items + 1)
        seq[i, L - ln:] = rng.choice(np.asarray(pool), size=ln)
    return seq


def _real_prompts(catalogue) -> tuple[list[str], list[str]]:
    from dpr.data.prompts import NEGATIVE, POSITIVE, PromptBank

    bank = PromptBank()
    tags = catalogue.tag_names or ["comedy"]
    pos = [bank.render(t, tag) for tag in tags for t in bank.templates(POSITIVE)]
    neg = [bank.render(t, tag) for tag in tags for t in bank.templates(NEGATIVE)]
    return pos, neg


def _parity(model, penc, te, catalogue, folder: Path, graphs: dict, custom_lib, cfg: ExportConfig,
            rng, table: np.ndarray) -> dict:
    import torch

    mcfg = model.cfg
    out: dict[str, dict] = {}
    # prompt encoder: random token batches + every real prompt of the template bank
    sess = _ort_session(folder / graphs[PROMPT_ENCODER]["file"])
    vocab = int(te.model.config.vocab_size)
    pad = te.tokenizer.pad_token_id or 0
    cases = {}
    for b in cfg.parity_batches:
        max_len = te.max_tokens if b <= 64 else min(te.max_tokens, 24)
        lens = rng.integers(1, max_len + 1, size=b)
        lens[0] = max_len
        ids = np.full((b, max_len), pad, dtype=np.int64)
        mask = np.zeros((b, max_len), dtype=np.int64)
        for i, ln in enumerate(lens):
            ids[i, :ln] = rng.integers(0, vocab, size=ln)
            mask[i, :ln] = 1
        cases[f"random_b{b}"] = (ids, mask)
    pos, neg = _real_prompts(catalogue)
    tk = te.tokenizer(pos + neg, padding=True, truncation=True, max_length=te.max_tokens, return_tensors="np")
    cases["real_prompts"] = (tk["input_ids"].astype(np.int64), tk["attention_mask"].astype(np.int64))
    res = {}
    real_p = None
    for key, (ids, mask) in cases.items():
        with torch.no_grad():
            ref = penc(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
        got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        res[key] = compare(got, ref, table[:, :mcfg.d])     # prompt vectors live in E's d columns
        if key == "real_prompts":
            real_p = (ref, got)
    res["all"] = merge(list(res.values()))
    out[PROMPT_ENCODER] = res

    # user encoders: random batches (short / full histories, four presence combinations) + real inputs
    n_pos = len(pos)
    p_ref, p_onnx = real_p
    user_cases = {}
    for b in cfg.parity_batches:
        for full in (False, True):
            user_cases[f"random_b{b}_{'full' if full else 'short'}"] = _random_user_batch(rng, b, mcfg, full, 1.0)
    b = max(cfg.parity_batches)
    seq = _real_histories(rng, catalogue, mcfg, b)
    ip = rng.integers(0, n_pos, size=b)
    ineg = rng.integers(0, len(neg), size=b)
    combos = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.int64)
    presence = combos[np.arange(b) % 4]
    user_cases["real"] = {"item_seq": seq, "p_pos": p_ref[ip], "p_neg": p_ref[n_pos + ineg], "presence": presence}
    short = user_cases[f"random_b{b}_short"]
    longest = max(1, int((short["item_seq"] > 0).sum(axis=1).max()))
    # the fused graph twice: with the kernel (custom-op library) and without it (ORT inlines the local function)
    runs = [(USER_ENCODER_PORTABLE, USER_ENCODER_PORTABLE, None), (USER_ENCODER, USER_ENCODER, custom_lib),
            (USER_ENCODER + INLINED_SUFFIX, USER_ENCODER, None)]
    for name, graph, lib in runs:
        if graph not in graphs:
            continue
        sess = _ort_session(folder / graphs[graph]["file"], lib)
        cases = dict(user_cases)
        if graphs[graph].get("history_trim"):
            # the graph run on histories cut to the batch's longest, against PyTorch on the full max_len
            cases["trimmed_history"] = dict(short, item_seq=np.ascontiguousarray(short["item_seq"][:, -longest:]),
                                            _reference_seq=short["item_seq"])
        res = {}
        for key, inp in cases.items():
            with torch.no_grad():
                ref = model(*(torch.from_numpy(inp.get("_reference_seq", inp["item_seq"]) if k == "item_seq"
                                               else inp[k]) for k in USER_INPUTS)).numpy()
            got = sess.run(None, {k: inp[k] for k in USER_INPUTS})[0]
            res[key] = compare(got, ref, table)
        # end to end on real prompts: ONNX prompt vectors into the ONNX user encoder vs all-PyTorch
        e2e = dict(user_cases["real"], p_pos=p_onnx[ip].astype(np.float32), p_neg=p_onnx[n_pos + ineg].astype(np.float32))
        with torch.no_grad():
            ref = model(*(torch.from_numpy(user_cases["real"][k]) for k in USER_INPUTS)).numpy()
        got = sess.run(None, {k: e2e[k] for k in USER_INPUTS})[0]
        res["real_end_to_end"] = compare(got, ref, table)
        res["all"] = merge(list(res.values()))
        out[name] = res
    return out


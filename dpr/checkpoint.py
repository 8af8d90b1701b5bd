"""Checkpoints: one plain dict, loadable with ``torch.load(weights_only=True)``.

Contents: format name + version, the model and training configs, the state dict, the item catalogue
(original ids, titles, tags), the text encoder's identity (source + hash of its files) and
training metadata. A file that is not ours, truncated, or of a newer version fails clearly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpr.config import ModelConfig, TrainConfig, from_dict, to_dict
from dpr.data.dataset import Catalogue
from dpr.errors import CheckpointError
from dpr.util import file_sha256  # noqa: F401  (re-exported: callers import it from here)

FORMAT_NAME = "dpr-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model_config: ModelConfig
    state_dict: dict
    catalogue: Catalogue
    text_encoder: dict                      # {"source", "hash", "dim", "max_tokens"}
    train_config: TrainConfig = field(default_factory=TrainConfig)
    meta: dict = field(default_factory=dict)  # dataset name, stages done, metrics, timings

    def build_model(self):
        from dpr.model import DPRModel

        try:
            model = DPRModel(self.model_config)
            missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint state does not match its model config: {exc}") from None
        if missing or unexpected:
            raise CheckpointError(f"checkpoint state does not match its model config: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        return model.eval()


def content_hash(payload: dict) -> str:
    """sha256 over everything a checkpoint holds but the hash itself: every tensor's name, dtype, shape and
    bytes (in name order), then the other fields as canonical JSON. A bit flipped in a weight or in the
    catalogue, which the zip container does not notice, changes it."""
    h = hashlib.sha256(state_hash(payload.get("state_dict") or {}).encode())
    rest = {k: v for k, v in payload.items() if k not in ("state_dict", "content_sha256")}
    h.update(json.dumps(rest, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def state_hash(state_dict: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_config": to_dict(ckpt.model_config),
        "train_config": to_dict(ckpt.train_config),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in ckpt.state_dict.items()},
        "catalogue": ckpt.catalogue.to_dict(),
        "text_encoder": dict(ckpt.text_encoder),
        "meta": dict(ckpt.meta),
    }
    payload["content_sha256"] = content_hash(payload)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise CheckpointError(f"{path} is not a readable dpr checkpoint (truncated or foreign file?): "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a dpr checkpoint (no '{FORMAT_NAME}' format marker)")
    version = payload.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this dpr reads versions "
                              f"1..{FORMAT_VERSION} (upgrade dpr to read newer checkpoints)")
    recorded = payload.get("content_sha256")    # absent in checkpoints written before it was recorded
    if recorded is not None:
        try:
            actual = content_hash(payload)
        except (TypeError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is a damaged dpr checkpoint: {exc}") from None
        if actual != recorded:
            raise CheckpointError(f"{path} is damaged: its content does not match the sha256 recorded when it "
                                  f"was written (a changed or corrupted byte); restore it or train again")
    try:
        return Checkpoint(
            model_config=from_dict(ModelConfig, payload["model_config"]),
            train_config=from_dict(TrainConfig, payload.get("train_config", {})),
            state_dict=payload["state_dict"],
            catalogue=Catalogue.from_dict(payload["catalogue"]),
            text_encoder=payload["text_encoder"],
            meta=payload.get("meta", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is a damaged dpr checkpoint: {type(exc).__name__}: {exc}") from None

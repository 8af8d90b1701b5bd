"""The backend interface: two graphs (prompt encoder, user encoder), numpy in, numpy out."""

from __future__ import annotations

import numpy as np


def cuda_available() -> bool:
    """True when a CUDA device is usable (checked through torch; False when torch has no CUDA)."""
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


class Backend:
    """Runs the export's two graphs.

    ``encode_prompts(input_ids, attention_mask)`` (B, S) int64 -> (B, d) float32;
    ``encode_users(item_seq, p_pos, p_neg, presence)`` -> (B, d) float32. Both must be safe to call from
    several threads at once. Batches are at most ``export.max_batch`` rows (the engine chunks).
    """

    name = "base"
    # Which prompt-encoder numerics produce this backend's prompt vectors ("fp32", "int8", "fp16"):
    # part of the prompt-cache key, so engines sharing one cache never hand each other's vectors out.
    prompt_variant = "fp32"
    # True when encode_users accepts item_seq cut to fewer than max_len columns (leading padding removed)
    # with the same result: the engine then runs short histories at their own length.
    trims_history = False
    # How many encode_* calls the engine should run at once, each on its own thread: > 1 when every call
    # runs single-threaded (ONNX Runtime CPU sessions with parallel_chunks), so that concurrent chunks,
    # not threads inside each operator, use the cores. 1: one call at a time (it parallelises inside).
    concurrent_runs = 1

    def __init__(self, export, device: str = "cpu", **options):
        self.export = export
        self.device = device

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        """(usable on ``device`` here, reason)."""
        return True, ""

    def encode_prompts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode_users(self, item_seq: np.ndarray, p_pos: np.ndarray, p_neg: np.ndarray,
                     presence: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device}

    def close(self) -> None:
        pass

"""The plain PyTorch pipeline every backend is compared with: what serving the model straight from its
PyTorch code looks like, with none of the engine's work.

Per batch: the Hugging Face tokenizer on every prompt as given (no de-duplication, no cache); the
frozen encoder + projection in eager fp32; the DPR model's forward; the full ``(B, N + 1)`` score
matrix, the whole history and the padding column set to -inf, ``torch.topk``; indices mapped back to
item ids. The weights are the export's own (``model_state.safetensors`` + ``text_encoder/``, as the
torch backend loads them; the pipeline reuses that backend's model objects but never its engine's
prompt cache, batching or tiled retriever). On CUDA every stage ends with a synchronisation so the
stage times are real.
"""

from __future__ import annotations

import time

import numpy as np

NAME = "pytorch-pipeline"


class PyTorchPipeline:
    name = NAME

    def __init__(self, export, device: str = "cpu", torch_backend=None, checkpoint: str | None = None):
        import torch

        from dpr.engine.backends.torch_backend import TorchBackend

        if torch_backend is None:
            opts = {"checkpoint": checkpoint} if checkpoint else {}
            torch_backend = TorchBackend(export, device, **opts)
        self._torch = torch
        self.device = torch.device(device)
        self.model = torch_backend.model
        self.text_encoder = torch_backend.prompt_encoder.text_encoder
        self.projection = torch_backend.prompt_encoder.projection
        self.tokenizer = self.text_encoder.tokenizer
        self.max_tokens = self.text_encoder.max_tokens
        self.max_len = export.max_len
        items = export.items()
        self.item_ids = [str(x) for x in items["ids"]]
        self._index = {a: i + 1 for i, a in enumerate(self.item_ids)}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def recommend(self, histories, prompts, negative_prompts, k: int = 10, timings: dict | None = None):
        """Top-``k`` original item ids per row (best first); ``timings`` gets seconds per stage (the
        engine's keys: tokenize, prompt_encoder, user_encoder, retrieval)."""
        torch = self._torch
        dev = self.device
        b = len(histories)
        t = {"tokenize": 0.0, "prompt_encoder": 0.0, "user_encoder": 0.0, "retrieval": 0.0}
        d = self.model.cfg.d
        p_pos = torch.zeros(b, d, device=dev)
        p_neg = torch.zeros(b, d, device=dev)
        presence = torch.zeros(b, 2, dtype=torch.int64)
        rows_pos = [i for i, p in enumerate(prompts) if p is not None]
        rows_neg = [i for i, p in enumerate(negative_prompts) if p is not None]
        texts = [prompts[i] for i in rows_pos] + [negative_prompts[i] for i in rows_neg]
        with torch.inference_mode():
            if texts:
                t0 = time.perf_counter()
                tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                     return_tensors="pt")
                t["tokenize"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                vec = self.projection(self.text_encoder(tok["input_ids"].to(dev), tok["attention_mask"].to(dev)))
                self._sync()
                t["prompt_encoder"] = time.perf_counter() - t0
                n = len(rows_pos)
                if rows_pos:
                    p_pos[rows_pos] = vec[:n]
                    presence[rows_pos, 0] = 1
                if rows_neg:
                    p_neg[rows_neg] = vec[n:]
                    presence[rows_neg, 1] = 1
            t0 = time.perf_counter()
            full = [[self._index[x] for x in h] for h in histories]
            seq = np.zeros((b, self.max_len), np.int64)
            for i, h in enumerate(full):
                h = h[-self.max_len:]
                seq[i, self.max_len - len(h):] = h
            users = self.model(torch.from_numpy(seq).to(dev), p_pos, p_neg, presence.to(dev))
            self._sync()
            t["user_encoder"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            longest = max(len(h) for h in full)
            hist = np.zeros((b, longest), np.int64)                 # padded with 0: the padding column
            for i, h in enumerate(full):
                hist[i, :len(h)] = h
            scores = users @ self.model.retrieval_table.T                # (B, N + 1)
            scores.scatter_(1, torch.from_numpy(hist).to(dev), float("-inf"))
            _, idx = torch.topk(scores, min(k, scores.shape[1] - 1), dim=1)
            idx = idx.cpu().numpy()
            t["retrieval"] = time.perf_counter() - t0
        if timings is not None:
            timings.update(t)
        return [[self.item_ids[j - 1] for j in row if j > 0] for row in idx]

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "torch": self._torch.__version__,
                "steps": "HF tokenizer -> eager fp32 encoder + projection -> DPRModel -> full score matrix -> "
                         "history mask -> torch.topk (no cache, no de-duplication, no tiling)"}

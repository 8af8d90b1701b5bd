"""PyTorch backend: the DPR model and prompt encoder rebuilt in PyTorch; the reference that every other
backend is checked against (it runs the model's own code, not the exported graphs).

Where the weights come from (first found):

1. an explicit ``checkpoint=PATH`` (or ``$DPR_CHECKPOINT``): the checkpoint the export was made from;
2. ``model_state.safetensors`` in the export folder (the DPR model's full state dict; ``dpr-export``
   writes it unless ``--no-torch-weights``);
3. the file named in ``manifest["checkpoint"]["file"]`` beside or inside the export folder.

A checkpoint's sha256 must match the manifest's ``checkpoint.sha256``.

The exported ONNX graphs cannot serve: the dynamo exporter folds and transposes many weights into
anonymous constants (``val_21`` = ``qkv.weight.T``, the position table into ``unsqueeze_1``...).

The frozen text encoder: ``text_encoder=PATH``, else a ``text_encoder/`` folder in the export, else the
folder recorded in ``manifest["text_encoder"]`` (``loaded_from`` / ``source``); its files' hash must match
the manifest's.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import numpy as np

from ..errors import BackendError
from .base import Backend, cuda_available


_DTYPES = {}          # filled on first use (torch imported lazily)
# Prompts are padded up to a multiple of this many tokens on a GPU: a handful of shapes (the kernels and
# cuBLAS plans of each are reused) instead of one per longest prompt; fp16 tensor cores want multiples of 8.
GPU_TOKEN_BUCKET = 16


def _find_checkpoint(export, explicit) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get("DPR_CHECKPOINT")
    if env:
        return Path(env)
    name = (export.manifest.get("checkpoint") or {}).get("file")
    if name:
        for cand in (export.path / name, export.path.parent / name):
            if cand.is_file():
                return cand
    return None


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, export, device: str = "cpu", checkpoint: str | None = None, text_encoder: str | None = None,
                 threads: int | None = None, compile: bool = False, fused_gate: bool | None = None,
                 graphs: bool | None = None, prompt_dtype: str | None = None, **options):
        super().__init__(export, device)
        if options:
            raise BackendError(f"torch backend got unknown option(s): {', '.join(sorted(options))}")
        import torch

        from dpr.config import ModelConfig, from_dict
        from dpr.model import DPRModel, PromptEncoder

        if device.startswith("cuda") and not cuda_available():
            raise BackendError("device=cuda asked for the torch backend but torch sees no CUDA device")
        if graphs is not None and not isinstance(graphs, bool):
            raise BackendError(f"torch backend: graphs must be True, False or None, got {graphs!r}")
        self._torch = torch
        self.tdevice = torch.device(device)
        # None: CUDA graphs on a GPU, the ordinary path on the CPU; True on the CPU: the same bucketed
        # device path run eagerly (what the CPU tests check the graphs' inputs and outputs with)
        self.graphs = graphs
        self.prompt_dtype = self._prompt_dtype(prompt_dtype)
        self.prompt_variant = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[self.prompt_dtype]
        if threads:
            torch.set_num_threads(int(threads))
        cfg = from_dict(ModelConfig, export.model_config)
        state, self.weights_source = self._load_state(export, checkpoint)
        model = DPRModel(cfg)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise BackendError(f"the torch weights do not match the export's model config: {exc}") from None
        if missing or unexpected:
            raise BackendError(f"the torch weights do not match the export's model config: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        self.model = model.eval().to(self.tdevice)
        self.gate = self._install_fused_gate(fused_gate)
        self.trims_history = bool(getattr(self.model.backbone, "padding_invariant", False))
        te = self._load_text_encoder(export, text_encoder)
        # its own copy of the projection: casting the prompt encoder to half must not cast the user encoder's
        proj = copy.deepcopy(self.model.projection)
        self.prompt_encoder = PromptEncoder(te, proj).eval().to(self.tdevice, dtype=_DTYPES[self.prompt_dtype])
        self._fp32_prompt_encoder = None
        self.compiled = bool(compile)
        self._user_fn = self.model
        self._user_lock = contextlib.nullcontext()     # a real lock once compiled
        if self.compiled:
            self._compile_user_encoder()

    def _prompt_dtype(self, want) -> str:
        """``prompt_dtype``: None (float16 on a GPU, float32 on the CPU) or a name; fills ``_DTYPES``."""
        torch = self._torch
        _DTYPES.update(float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16)
        if want is None:
            return "float16" if self.tdevice.type == "cuda" else "float32"
        if want not in _DTYPES:
            raise BackendError(f"torch backend: prompt_dtype must be one of {sorted(_DTYPES)} or None, got {want!r}")
        return want

    def prompt_cosine_to_fp32(self, input_ids, attention_mask) -> float:
        """Worst-row cosine between this backend's prompt vectors and an fp32 copy's on the same tokens
        (1.0 when the prompt encoder is fp32): what ``dpr-bench`` records for a half-precision encoder."""
        if self.prompt_dtype == "float32":
            return 1.0
        torch = self._torch
        if self._fp32_prompt_encoder is None:
            self._fp32_prompt_encoder = copy.deepcopy(self.prompt_encoder).float()
        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.tdevice)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.tdevice)
        with torch.inference_mode():
            ref = self._fp32_prompt_encoder(ids, mask).double()
            got = torch.from_numpy(self.encode_prompts(input_ids, attention_mask)).to(self.tdevice).double()
            cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
        return float(cos.min())

    def device_path(self, retriever, max_batch: int):
        """``(DevicePath or None, reason)``: the user encoder and the torch retriever on one device, from CUDA
        graphs on a GPU (see :mod:`dpr.engine.device_path`)."""
        if self.graphs is False:
            return None, "off (graphs=False)"
        if self.compiled:
            return None, "off (compile=True runs the user encoder through torch.compile instead)"
        table = getattr(retriever, "_table_t", None)
        if getattr(retriever, "name", None) != "torch" or table is None:
            return None, f"off (the {getattr(retriever, 'name', '?')!r} retriever runs its own search)"
        if table.device != self.tdevice:
            return None, f"off (the retriever's table is on {table.device}, the model on {self.tdevice})"
        if self.tdevice.type != "cuda" and self.graphs is None:
            return None, "off on the CPU (CUDA graphs need a GPU; graphs=True runs the bucketed path eagerly)"
        from ..device_path import DevicePath

        dp = DevicePath(self.model, table, int(self.export.max_len), int(self.model.cfg.d), max_batch,
                        self.trims_history, graphs=self.tdevice.type == "cuda")
        how = "CUDA graphs per bucket" if dp.graphs else "bucketed, eager (no CUDA)"
        return dp, f"user encoder + retrieval on {self.tdevice}: {how}"

    def _install_fused_gate(self, want: bool | None) -> str:
        """The MoE gate as ``torch.ops.dpr.moe_gate`` (the C++ twin on the CPU, the CUDA kernel on a GPU; no
        Python between the model and the kernel) when its library is built (``python -m dpr.kernels.build``;
        never compiled here, at load), else the plain-PyTorch reference. ``fused_gate``: None (auto), True
        (an error when the library is missing), False (the reference). Returns what serves the gate."""
        if want is not None and not isinstance(want, bool):
            raise BackendError(f"torch backend: fused_gate must be True, False or None, got {want!r}")
        if want is False:
            return "reference (fused_gate=False)"
        from dpr.model.moe import MoE

        try:
            from dpr.kernels import moe_gate_op

            st = moe_gate_op.load(build=False)
        except Exception as exc:  # noqa: BLE001 - the kernels are optional: the reference serves
            st = {"cpu": None, "cuda": None, "why": {"cpu": f"{type(exc).__name__}: {exc}"}}
        key = "cuda" if self.tdevice.type == "cuda" else "cpu"
        if st.get(key) != "cpp":
            why = st["why"].get(key) or st["why"].get("cpu") or "not available"
            if want:
                raise BackendError(f"torch backend: fused_gate=True but dpr::moe_gate has no C++ {key} kernel: {why}")
            return f"reference (dpr::moe_gate not available: {why})"
        op = self._torch.ops.dpr.moe_gate
        for m in self.model.modules():
            if isinstance(m, MoE):
                m.gate = op
        return "dpr::moe_gate (" + ("CUDA kernel" if key == "cuda" else "C++ CPU twin") + ")"

    def _compile_user_encoder(self) -> None:
        """``compile=True``: the user encoder through ``torch.compile(dynamic=True)`` (fused element-wise
        kernels: the SASRec user encoder at batch 256 went 19.6 -> 10.3 ms at max_len 50 on 2 CPU cores;
        about 30 s of compilation). Compiled once here on a small batch, so a missing compiler is a load
        error; calls are serialised (dynamo's compile caches are not meant for concurrent first calls)."""
        import threading

        torch = self._torch
        fn = torch.compile(self.model, dynamic=True)
        L, d = int(self.export.max_len), int(self.model.cfg.d)
        probe = (torch.ones(2, L, dtype=torch.int64, device=self.tdevice), torch.zeros(2, d, device=self.tdevice),
                 torch.zeros(2, d, device=self.tdevice), torch.zeros(2, 2, dtype=torch.int64, device=self.tdevice))
        try:
            with torch.inference_mode():
                fn(*probe)
        except Exception as exc:  # noqa: BLE001 - inductor raises many types (compiler missing, ...)
            raise BackendError(f"torch backend: compile=True failed: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        self._user_fn = fn
        self._user_lock = threading.Lock()

    def _load_state(self, export, checkpoint):
        st = export.path / "model_state.safetensors"
        explicit = checkpoint or os.environ.get("DPR_CHECKPOINT")
        if st.is_file() and not explicit:
            from safetensors.torch import load_file

            try:
                return load_file(str(st)), str(st)
            except Exception as exc:  # safetensors raises its own error types for damaged files
                raise BackendError(f"{st} is not a readable safetensors file: {exc}") from None
        ck_path = _find_checkpoint(export, checkpoint)
        if ck_path is None:
            raise BackendError(
                "the torch backend needs the model's weights in PyTorch form, and this export has none "
                "(no model_state.safetensors): pass checkpoint=PATH (--checkpoint) to the checkpoint it was "
                "exported from, or set DPR_CHECKPOINT")
        if not ck_path.is_file():
            raise BackendError(f"checkpoint not found: {ck_path}")
        from dpr.checkpoint import file_sha256, load_checkpoint

        want = (export.manifest.get("checkpoint") or {}).get("sha256")
        if want and file_sha256(ck_path) != want:
            raise BackendError(f"checkpoint {ck_path} is not the one this export was made from (sha256 mismatch)")
        ck = load_checkpoint(ck_path)
        return ck.state_dict, str(ck_path)

    def _load_text_encoder(self, export, explicit):
        from dpr.model.text_encoder import TextEncoder, encoder_hash

        ident = export.manifest.get("text_encoder") or {}
        cands = [explicit] if explicit else [export.path / "text_encoder", ident.get("loaded_from"), ident.get("source")]
        source = next((str(c) for c in cands if c and Path(c).is_dir()), None)
        if source is None:
            raise BackendError("the torch backend needs the text encoder's PyTorch weights: none of "
                               f"{[str(c) for c in cands if c]} is a folder; pass text_encoder=PATH")
        want = ident.get("hash")
        if want and encoder_hash(source) != want:
            raise BackendError(f"text encoder at {source} does not match the export's (hash mismatch)")
        self.text_encoder_source = source
        return TextEncoder.load(source, max_tokens=int(ident.get("max_tokens") or 64))

    def encode_prompts(self, input_ids, attention_mask):
        torch = self._torch
        input_ids, attention_mask = np.ascontiguousarray(input_ids), np.ascontiguousarray(attention_mask)
        if self.tdevice.type == "cuda" and input_ids.shape[1] % GPU_TOKEN_BUCKET:
            # pad to the token bucket: padding tokens are masked out of attention and pooling
            pad = GPU_TOKEN_BUCKET - input_ids.shape[1] % GPU_TOKEN_BUCKET
            input_ids = np.pad(input_ids, ((0, 0), (0, pad)))
            attention_mask = np.pad(attention_mask, ((0, 0), (0, pad)))
        with torch.inference_mode():
            out = self.prompt_encoder(torch.from_numpy(input_ids).to(self.tdevice, non_blocking=True),
                                      torch.from_numpy(attention_mask).to(self.tdevice, non_blocking=True))
        return out.float().cpu().numpy()

    def encode_users(self, item_seq, p_pos, p_neg, presence):
        torch = self._torch
        t = [torch.from_numpy(np.ascontiguousarray(a)).to(self.tdevice) for a in (item_seq, p_pos, p_neg, presence)]
        with torch.inference_mode(), self._user_lock:
            out = self._user_fn(*t)
        return out.float().cpu().numpy()

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "torch": self._torch.__version__,
                "weights": self.weights_source, "text_encoder": self.text_encoder_source, "compiled": self.compiled,
                "gate": self.gate, "prompt_dtype": self.prompt_dtype, "graphs": self.graphs}

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        try:
            import torch
        except ImportError:
            return False, "torch is not installed"
        if device.startswith("cuda") and not cuda_available():
            return False, "torch sees no CUDA device"
        return True, f"torch {torch.__version__}"

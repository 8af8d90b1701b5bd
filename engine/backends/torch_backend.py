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
import os
from pathlib import Path

import numpy as np

from ..errors import BackendError
from .base import Backend, cuda_available


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
                 threads: int | None = None, compile: bool = False, fused_gate: bool | None = None, **options):
        super().__init__(export, device)
        if options:
            raise BackendError(f"torch backend got unknown option(s): {', '.join(sorted(options))}")
        import torch

        from dpr.config import ModelConfig, from_dict
        from dpr.model import DPRModel, PromptEncoder

        if device.startswith("cuda") and not cuda_available():
            raise BackendError("device=cuda asked for the torch backend but torch sees no CUDA device")
        self._torch = torch
        self.tdevice = torch.device(device)
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
        self.prompt_encoder = PromptEncoder(te, self.model.projection).eval().to(self.tdevice)
        self.compiled = bool(compile)
        self._user_fn = self.model
        self._user_lock = contextlib.nullcontext()     # a real lock once compiled
        if self.compiled:
            self._compile_user_encoder()

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
        with torch.inference_mode():
            out = self.prompt_encoder(torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.tdevice),
                                      torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.tdevice))
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
                "gate": self.gate}

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        try:
            import torch
        except ImportError:
            return False, "torch is not installed"
        if device.startswith("cuda") and not cuda_available():
            return False, "torch sees no CUDA device"
        return True, f"torch {torch.__version__}"

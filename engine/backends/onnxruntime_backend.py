"""ONNX Runtime backend: one session per graph, shared by all threads (``InferenceSession.run`` is
thread-safe). CPU: graph optimisation ALL; by default (``parallel_chunks``) single-threaded sessions, the
engine running as many chunks of a batch at once as there are physical cores (``concurrent_runs``), else
intra-op threads = physical cores. GPU: CUDA execution
provider with IO binding (inputs copied once, output bound on the device then fetched).

The user encoder is the fused graph (``user_encoder.onnx``, one ``dpr::FusedMoEGate`` node per gate)
when the export has it and the kernels' custom-op library is present (``fused=None``: auto,
``True``: required, ``False``: never); otherwise the export's portable graph where it wrote one, else the
same fused graph without the library: ONNX Runtime inlines its ``dpr::FusedMoEGate`` model-local function,
the portable gating (the default export has no other user graph).

The prompt encoder is ``prompt_encoder.onnx`` (``prompt_encoder="fp32"``, the default) or, with
``prompt_encoder="int8"``, the per-channel dynamically quantised ``prompt_encoder_int8.onnx`` that
``dpr-export --int8`` writes (its worst-row cosine to fp32 is in the manifest). A shared
:class:`~dpr.engine.prompt_cache.PromptCache` keeps int8 and fp32 vectors apart (the engine's cache key
holds ``prompt_variant``).
"""

from __future__ import annotations

import numpy as np

from dpr.util import physical_cores
from dpr.errors import require

from ..errors import BackendError
from ..graph_domains import check_graph_domains
from .base import Backend, cuda_available


def _custom_op_library(cuda: bool) -> tuple[str | None, str]:
    try:
        from dpr.kernels import build as kbuild
    except Exception as exc:  # noqa: BLE001
        return None, f"dpr.kernels unavailable ({type(exc).__name__}: {exc})"
    try:
        lib = kbuild.ort_library_path(cuda=cuda) if cuda else kbuild.ort_library_path(cuda=False)
        if lib is None and cuda:
            lib = kbuild.ort_library_path(cuda=False)
    except Exception as exc:  # noqa: BLE001
        return None, f"custom-op library lookup failed ({type(exc).__name__}: {exc})"
    if lib is None:
        return None, "custom-op library libdpr_ort_ops.so not built (python -m dpr.kernels.build)"
    return lib, ""


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, export, device: str = "cpu", fused: bool | None = None, intra_op_threads: int | None = None,
                 custom_op_library: str | None = None, prompt_encoder: str = "fp32", spin: bool = False,
                 disabled_optimizers: tuple | list | None = None, parallel_chunks: bool | None = None,
                 **options):
        super().__init__(export, device)
        if options:
            raise BackendError(f"onnxruntime backend got unknown option(s): {', '.join(sorted(options))}")
        pe_graph = {"fp32": "prompt_encoder", "int8": "prompt_encoder_int8"}.get(str(prompt_encoder).lower())
        if pe_graph is None:
            raise BackendError(f"onnxruntime backend: prompt_encoder must be 'fp32' or 'int8', got {prompt_encoder!r}")
        pe_file = export.graph_file(pe_graph)
        if pe_file is None:
            raise BackendError(f"prompt_encoder={prompt_encoder!r} asked for, but the export {export.path} has no "
                               f"{pe_graph} graph (re-export with: dpr-export CKPT --int8)")
        self.prompt_variant = str(prompt_encoder).lower()
        ort = require("onnxruntime", "the onnxruntime backend")
        self._ort = ort
        self.on_gpu = device.startswith("cuda")
        if self.on_gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu) for device=cuda")
        self.threads = int(intra_op_threads or physical_cores())
        self.spin = bool(spin)        # True: ORT's default busy-wait between runs (lowest latency when alone)
        # parallel_chunks (CPU): each session runs on one thread and the engine runs `threads` chunks of a batch
        # at once. The graphs are many small operators on (rows, L, 64) activations; splitting each of them over
        # 2 threads pays a sync per operator and streams activations too big for L2, while one chunk per core
        # keeps them in cache (timings: docs/ARCHITECTURE.md, "Measurements behind the defaults"). A lone
        # single-row request then uses one core. Never on a GPU.
        if parallel_chunks is not None and not isinstance(parallel_chunks, bool):
            raise BackendError(f"parallel_chunks must be True, False or None (auto), got {parallel_chunks!r}")
        if parallel_chunks and self.on_gpu:
            raise BackendError("parallel_chunks is a CPU setting (a GPU session is not run from several threads)")
        self.parallel_chunks = (not self.on_gpu and self.threads > 1) if parallel_chunks is None else parallel_chunks
        self.concurrent_runs = self.threads if self.parallel_chunks else 1
        # ORT's CPU SkipLayerNormalization kernel (the fusion of Add + LayerNormalization) was the slow part of
        # the MiniLM prompt encoder on the CPU: without the fusion both int8 and fp32 ran faster, the user
        # encoder unchanged (docs/ARCHITECTURE.md, "Measurements behind the defaults"). Kept on CUDA (not
        # measured there).
        if disabled_optimizers is None:
            disabled_optimizers = () if self.on_gpu else ("SkipLayerNormFusion",)
        if isinstance(disabled_optimizers, str) or not all(isinstance(o, str) for o in disabled_optimizers):
            raise BackendError(f"disabled_optimizers must be a list of ORT optimizer names, got {disabled_optimizers!r}")
        self.disabled_optimizers = tuple(disabled_optimizers)
        dev_id = int(device.split(":", 1)[1]) if ":" in device else 0
        self.providers = ([("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"]
                          if self.on_gpu else ["CPUExecutionProvider"])
        self.device_id = dev_id

        # user encoder: fused when possible
        fused_file = export.graph_file("user_encoder")
        lib, why = (custom_op_library, "") if custom_op_library else _custom_op_library(self.on_gpu)
        if fused_file is None:
            why = (export.manifest.get("skipped") or {}).get("user_encoder", "the export has no fused graph")
        use_fused = fused_file is not None and lib is not None
        if fused is True and not use_fused:
            raise BackendError(f"fused user encoder requested but unavailable: {why}")
        if fused is False:
            use_fused, why = False, "disabled (fused=False)"
        self.fused = use_fused
        self.fused_reason = "fused dpr::FusedMoEGate graph with " + str(lib) if use_fused else f"portable graph: {why}"
        self.custom_op_library = lib if use_fused else None
        self.prompt_session = self._session(pe_file, None)
        self.prompt_graph = pe_file.name
        ufile = fused_file if use_fused else export.graph_file("user_encoder_portable")
        if ufile is None:
            # a single-graph export: without the custom-op library ORT inlines the fused graph's
            # dpr::FusedMoEGate local function, which is the portable gating
            ufile = fused_file
            self.fused_reason = f"portable gating (the local function of {fused_file.name}, inlined): {why}"
        self.user_session = self._session(ufile, self.custom_op_library)
        self.user_graph = ufile.name
        # a graph exported with a dynamic history axis (padding-invariant backbone, manifest history_trim)
        entry = next((g for g in export.manifest.get("graphs", {}).values() if g.get("file") == ufile.name), {})
        seq_dim = next((i.shape[1] for i in self.user_session.get_inputs() if i.name == "item_seq"), None)
        self.trims_history = bool(entry.get("history_trim")) and not isinstance(seq_dim, int)

    def _session(self, path, lib):
        ort = self._ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = 1 if self.parallel_chunks else self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if not self.spin:
            # ORT's idle workers spin after every run; the next stage (the retriever's threads) then shares
            # its cores with them, and the fused retrieval that follows the user encoder slows down (measured:
            # docs/ARCHITECTURE.md, "Measurements behind the defaults")
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if lib:
            so.register_custom_ops_library(str(lib))
        check_graph_domains(path)                  # before ORT, which would run any contrib op it implements
        try:
            return ort.InferenceSession(str(path), so, providers=self.providers,
                                        disabled_optimizers=list(self.disabled_optimizers) or None)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            raise BackendError(f"onnxruntime cannot load {path.name}: {type(exc).__name__}: {exc}") from None

    def _run(self, sess, feeds: dict, out: str) -> np.ndarray:
        if not self.on_gpu:
            return sess.run([out], feeds)[0]
        binding = sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        binding.bind_output(out, "cuda", self.device_id)
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def encode_prompts(self, input_ids, attention_mask):
        return self._run(self.prompt_session, {"input_ids": input_ids, "attention_mask": attention_mask},
                         "prompt_vector").astype(np.float32, copy=False)

    def encode_users(self, item_seq, p_pos, p_neg, presence):
        return self._run(self.user_session, {"item_seq": item_seq, "p_pos": p_pos, "p_neg": p_neg,
                                             "presence": presence}, "user_vector").astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "providers": [p if isinstance(p, str) else p[0]
                                                                           for p in self.providers],
                "intra_op_threads": 1 if self.parallel_chunks else self.threads, "spin": self.spin,
                "parallel_chunks": self.parallel_chunks, "concurrent_runs": self.concurrent_runs,
                "disabled_optimizers": list(self.disabled_optimizers), "prompt_graph": self.prompt_graph,
                "user_graph": self.user_graph, "trims_history": self.trims_history, "fused": self.fused,
                "fused_reason": self.fused_reason, "onnxruntime": self._ort.__version__}

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed"
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return False, "onnxruntime has no CUDA execution provider"
            if not cuda_available():
                return False, "no CUDA device"
        return True, f"onnxruntime {ort.__version__}"

"""dpr: inference engine for Decoupled Promptable Sequential Recommendation.

Sub-packages: ``dpr.data`` (datasets, splits, prompts), ``dpr.model`` (backbones, prompt encoder,
Fusion, MoE and the fused-gate reference), ``dpr.train`` (three-stage training), ``dpr.eval``
(the evaluation protocol), ``dpr.export`` (ONNX export), ``dpr.kernels`` (the fused MoE gate op),
``dpr.engine`` (batched promptable retrieval) and ``dpr.bench`` (benchmarks).
"""

__version__ = "0.1.0"

from dpr.errors import DPRError  # noqa: E402,F401

"""``dpr.bench``: ``dpr-bench`` (how fast the engine serves a model here, where the time goes, and how it
compares with the plain PyTorch pipeline) and pytest-benchmark micro-benchmarks (``bench_*.py``).

``config`` (BenchConfig: the flags), ``default_model`` (the UNTRAINED model built when no export is
given), ``workload`` (the requests), ``pipeline`` (the plain PyTorch baseline), ``backends`` (which
backends run), ``measure`` (interleaved timing loops), ``gating`` (fused vs portable gate, timed by
``gate_timing``), ``retrieval`` (retrievers vs the machine's ceilings, timed by ``retrieval_speed``),
``runner`` (all of it in order), ``report`` (summary, table, JSON, plot), ``machine`` (CPU/GPU/versions),
``cli`` (the command). Also the soak (``soak``, ``soak_*``), ``user_graphs`` (one user graph for every
runtime, measured) and ``demo`` (``make demo``).
"""

if __name__ != "dpr.bench":  # imported as the bare name 'bench': never this folder (dpr/_bare_name.py)
    from dpr._bare_name import defer_to_installed

    defer_to_installed(__name__, __file__)

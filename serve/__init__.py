"""``dpr.serve``: dpr behind the serving stacks platform teams already run.

* ``http_app``: an HTTP service (FastAPI + uvicorn): the KServe v2 / Open Inference Protocol routes Triton
  also serves, a friendly ``POST /recommend``, OpenAPI docs, Prometheus ``/metrics``, limits, hot reload.
* ``triton_repo`` / ``triton_python``: a Triton model repository (``config.pbtxt`` with Triton's dynamic
  batcher + a Python-backend ``model.py``) for NVIDIA's Triton container (``dpr-export --triton-repo DIR``).
* ``triton_server``: the tritonserver nvidia-pytriton ships, started on such a repository
  (``dpr-serve --triton EXPORT_DIR``).
* ``ray``: a Ray Serve deployment of the engine (replicas, ``@serve.batch``, health checks, rolling export
  updates; the ``/recommend`` schema of ``http_app``): ``dpr-serve --ray EXPORT_DIR`` (the ``scale`` extra).
* ``columns`` / ``tensors``: every front end turns its requests into ``RequestBatch`` columns and calls
  ``Engine.recommend_batch`` once per batch (Python runs per batch, not per request).
* ``cli``: ``dpr-serve``; ``procs``: start/stop a server process; ``load``: the load test
  (``python -m dpr.serve.load``).
"""

if __name__ != "dpr.serve":  # imported as the bare name 'serve': never this folder (dpr/_bare_name.py)
    from dpr._bare_name import defer_to_installed

    defer_to_installed(__name__, __file__)

"""``dpr-serve EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--triton | --ray [--num-replicas N]] [...]``

Every flag but ``--triton``, ``--ray``, ``--num-replicas``, ``--ray-address`` and ``--log-level`` mirrors a field of :class:`~dpr.serve.config.ServeConfig`.
Without ``--triton``: the HTTP service (FastAPI on uvicorn; SIGTERM drains, SIGHUP reloads the export).
With ``--triton``: the export bound as a Triton model (a repository from ``triton_repo`` in a temporary folder,
served by the tritonserver nvidia-pytriton ships, with Triton's dynamic batcher; ``--port`` is Triton's HTTP
port, ``--grpc-port`` its gRPC port); needs the ``triton`` extra (``make triton-env``).
With ``--ray``: a Ray Serve application (:mod:`dpr.serve.ray`), ``--num-replicas`` engines behind
``--host``/``--port``; blocks until interrupted; needs the ``scale`` extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from dpr.cli.args import add_dataclass_args, dataclass_from_args, run_cli

from .config import ServeConfig

PROG = "dpr-serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a dpr-export folder over HTTP (KServe v2 routes, "
                                "/recommend, /metrics) or as a Triton model (--triton).")
    p.add_argument("export_dir", help="folder written by dpr-export")
    p.add_argument("--triton", action="store_true", help="serve through Triton Inference Server (the tritonserver nvidia-pytriton ships)")
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve application (replicas on a Ray "
                   "cluster; needs the scale extra): README 'Past one machine'")
    p.add_argument("--num-replicas", type=int, default=1, help="--ray: engine replicas behind the endpoint")
    p.add_argument("--ray-address", default=None, help="--ray: join this Ray cluster (default: start a local one)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_dataclass_args(p, ServeConfig, title="ServeConfig")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)

    def run() -> int:
        cfg = dataclass_from_args(ServeConfig, args).check()
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if not os.path.isdir(args.export_dir):
            raise FileNotFoundError(f"export folder {args.export_dir!r} does not exist")
        if args.triton and args.ray:
            raise ValueError("--triton and --ray are two ways to serve: pick one")
        if args.ray:
            from .ray import run as serve_ray

            if args.num_replicas < 1:
                raise ValueError(f"--num-replicas must be >= 1, got {args.num_replicas}")
            serve_ray(args.export_dir, cfg, num_replicas=args.num_replicas, ray_address=args.ray_address)
            return 0
        if args.triton:
            from .triton_server import serve_triton

            return serve_triton(args.export_dir, cfg)
        import uvicorn

        from .http_app import create_app
        from .http_front import protocol_for
        from .service import Service

        if cfg.switch_interval_us:
            sys.setswitchinterval(cfg.switch_interval_us / 1e6)
        app = create_app(Service(args.export_dir, cfg))
        # uvicorn re-raises SIGTERM once it has drained and shut down; end then with status 0 (a clean stop)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # uvicorn: SIGTERM stops accepting, waits for in-flight requests (at most drain_timeout_s), then the
        # app's shutdown drains the batcher queue and closes the engine
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level, access_log=False,
                    timeout_graceful_shutdown=int(cfg.drain_timeout_s) or None, http=protocol_for(app))
        return 0

    return run_cli(PROG, run)


if __name__ == "__main__":
    sys.exit(main())

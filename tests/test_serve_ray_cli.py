"""``dpr-serve --ray EXPORT_DIR``: the command starts its own local Ray cluster, serves the HTTP service's
/recommend on 127.0.0.1 with the in-process engine's answers, and SIGTERM takes the application and the
cluster down (no process of its group left). Bad flag combinations are one clear line, exit 2."""

from __future__ import annotations

import sys

import pytest

httpx = pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[scale]')")

from dpr.serve.procs import Server, free_port  # noqa: E402


def test_cli_refuses_bad_combinations(export_dir, capsys):
    from dpr.serve.cli import main

    assert main([str(export_dir), "--ray", "--triton"]) == 2
    assert "pick one" in capsys.readouterr().err
    assert main([str(export_dir), "--ray", "--num-replicas", "0"]) == 2
    assert "--num-replicas must be >= 1" in capsys.readouterr().err


def test_build_app_refuses_unknown_config(export_dir):
    from dpr.errors import InputError
    from dpr.serve.ray import app_builder, build_app

    with pytest.raises(InputError, match="unknown ServeConfig field"):
        build_app(export_dir, {"max_batchsize": 4})
    with pytest.raises(InputError, match="num_replicas or autoscaling_config"):
        build_app(export_dir, num_replicas=2, autoscaling_config={"min_replicas": 1})
    with pytest.raises(InputError, match="export_dir"):
        app_builder({"num_replicas": 1})


def test_dpr_serve_ray_serves_and_stops(export_dir, engine, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-P", "-m", "dpr.serve.cli", str(export_dir), "--ray", "--num-replicas", "1",
           "--port", str(port), "--backend", "onnxruntime", "--retriever", "onnxruntime"]
    s = Server(cmd, port, log_path=tmp_path / "ray-cli.log").start(timeout=180)
    try:
        req = {"history": ["i1", "i2", "i3"], "prompt": "something funny", "k": 5}
        r = httpx.post(s.url + "/recommend", json=req, timeout=30)
        assert r.status_code == 200, r.text
        want = engine.recommend([req["history"]], prompts=[req["prompt"]], k=5)[0].to_dict()
        assert [i["id"] for i in r.json()["items"]] == [i["id"] for i in want["items"]]
    finally:
        code = s.stop(timeout=60)
    assert code == 0, s.log()
    assert not s.leftover, "processes of dpr-serve --ray's group outlived it"

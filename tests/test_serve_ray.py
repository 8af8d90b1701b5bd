"""dpr.serve.ray on a local Ray cluster the test starts (2 CPUs, 2 replicas, HTTP on 127.0.0.1), never a mock:
answers equal the in-process engine's; a replica killed under a bounded load loses no request (the README's
client retry policy: retry a connection error or a 5xx, at most RETRIES times) and Serve replaces it; a new
export rolls out to the replicas under load with no failed request at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[scale]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[scale]')")

from ray import serve  # noqa: E402

from dpr.serve.procs import free_port  # noqa: E402

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))

CONFIG = {"backend": "onnxruntime", "retriever": "onnxruntime"}   # as the `engine` fixture
OPTIONS = dict(num_replicas=2, ray_actor_options={"num_cpus": 0.5}, health_check_period_s=1,
               health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
RETRIES = 8                    # the README's client policy: a 5xx or a broken connection is retried
LOAD_REQUESTS = 60             # bounded load: this many requests ...
LOAD_SECONDS = 90              # ... or this long, whichever ends first

REQUESTS = [
    {"history": ["i1", "i2", "i3"], "prompt": "something funny", "k": 5},
    {"history": ["i10"], "negative_prompt": "no horror", "k": 3},
    {"history": ["i4", "i9", "i33", "i120", "i7"], "prompt": "more comedy", "negative_prompt": "no horror"},
    {"history": ["i5", "i6"], "hard_filter": {"include_tags": ["comedy"], "exclude_items": ["i47"]}, "k": 4},
]


from dpr_tests_serve_answers import assert_same, expected  # noqa: E402 - tests/serve_answers.py (conftest.py)


@pytest.fixture(scope="module")
def cluster(export_dir):
    from dpr.serve.ray import build_app, init_ray

    if ray.is_initialized():
        pytest.skip("a Ray cluster is already running in this process")
    port = free_port()
    with contextlib.chdir(REPO):      # a driver started in the repository root, as `make test` starts one
        init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(export_dir, CONFIG, **OPTIONS), name="dpr", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(client: httpx.Client, url: str, body, retries: int = RETRIES) -> tuple[httpx.Response, int]:
    """The documented client policy: retry a broken connection or a 5xx with a short backoff."""
    for attempt in range(retries + 1):
        try:
            r = client.post(url + "/recommend", json=body, timeout=30)
            if r.status_code < 500:
                return r, attempt
        except httpx.TransportError:
            if attempt == retries:
                raise
        time.sleep(min(0.1 * 2 ** attempt, 2.0))
    return r, retries


def replicas() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::")}


def running_replicas() -> int:
    st = serve.status().applications["dpr"].deployments["dpr"]
    return int(st.replica_states.get("RUNNING", 0))


def load(url: str, engine, stop_after=LOAD_REQUESTS, on_progress=None, retries=RETRIES) -> list:
    """Two client threads, LOAD_REQUESTS requests at most, LOAD_SECONDS at most: (request, response, retries)."""
    done: list = []
    lock = threading.Lock()
    t_end = time.monotonic() + LOAD_SECONDS

    def client():
        with httpx.Client() as c:
            while time.monotonic() < t_end:
                with lock:
                    i = len(done)
                    if i >= stop_after:
                        return
                    done.append(None)
                req = REQUESTS[i % len(REQUESTS)]
                r, tries = post(c, url, req, retries)
                done[i] = (req, r, tries)
                if on_progress is not None:
                    on_progress(i)

    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda _: client(), range(2)))
    return [d for d in done if d is not None]


def test_answers_equal_the_engine(cluster, engine):
    with httpx.Client() as c:
        assert c.get(cluster + "/v2/health/ready", timeout=10).json() == {"ready": True}
        for req in REQUESTS:
            r, _ = post(c, cluster, req, retries=0)
            assert r.status_code == 200, r.text
            assert_same(r.json(), expected(engine, req))
        r, _ = post(c, cluster, REQUESTS, retries=0)       # a list: answered in order
        assert r.status_code == 200
        for got, req in zip(r.json(), REQUESTS):
            assert_same(got, expected(engine, req))
        bad, _ = post(c, cluster, {"history": ["no-such-id"]}, retries=0)
        assert bad.status_code == 422 and "unknown item id 'no-such-id'" in bad.json()["error"]
        bad, _ = post(c, cluster, {"history": ["i1"], "k": "ten"}, retries=0)
        assert bad.status_code == 422 and "k" in bad.json()["error"]
    assert running_replicas() == 2


def test_killed_replica_loses_no_request_and_is_replaced(cluster, engine):
    before = replicas()
    assert len(before) == 2
    victim = sorted(before)[0]
    killed = threading.Event()

    def kill_once(i):
        if i >= 10 and not killed.is_set():
            killed.set()
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    results = load(cluster, engine, on_progress=kill_once)
    assert killed.is_set()
    assert len(results) == LOAD_REQUESTS, "the bounded load ran out of time"
    for req, r, _ in results:
        assert r.status_code == 200, r.text
        assert_same(r.json(), expected(engine, req))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:     # the status can say 2 RUNNING before Serve has noticed the death
        now = replicas()
        if victim not in now and len(now) == 2 and running_replicas() == 2:
            break
        time.sleep(1)
    now = replicas()
    assert victim not in now and len(now) == 2 and running_replicas() == 2, (before, now)


def test_new_export_rolls_out_with_no_failed_request(cluster, engine, export_dir, tmp_path):
    from dpr.serve.ray import build_app

    new = tmp_path / "export-v2"
    shutil.copytree(export_dir, new)
    out: dict = {}

    def rollout(i):
        if i == 5 and "started" not in out:
            out["started"] = True
            threading.Thread(target=lambda: out.setdefault(
                "ok", serve.run(build_app(new, CONFIG, **OPTIONS), name="dpr", route_prefix="/"))).start()

    results = load(cluster, engine, on_progress=rollout, retries=0)     # no retry: not one may fail
    deadline = time.monotonic() + 120
    while "ok" not in out and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "ok" in out, "the rollout did not finish"
    for req, r, _ in results:
        assert r.status_code == 200, r.text
        assert_same(r.json(), expected(engine, req))
    with httpx.Client() as c:                     # every replica now serves the new folder
        seen = {c.get(cluster + "/v2/models/dpr", timeout=10).json()["parameters"]["export"] for _ in range(12)}
    assert seen == {str(new)}


def test_workers_never_have_the_repository_root_on_sys_path(cluster):
    """Ray puts the driver's working directory on every worker's sys.path unless the job has a working_dir;
    init_ray gives it an empty one, so a cluster started in the repository root never shadows installed
    modules with engine/, kernels/, ..."""
    @ray.remote
    def where():
        import os
        import sys
        return sys.path, os.getcwd()

    paths, cwd = ray.get(where.remote(), timeout=120)
    assert not [p for p in paths if os.path.realpath(p or cwd) == REPO], paths
    assert os.path.realpath(cwd) != REPO

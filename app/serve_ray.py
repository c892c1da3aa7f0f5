"""`retrv serve ... --ray`: the same HTTP service (app/serve.py `create_app`, Gate and all) as a Ray Serve
application with N replicas, each a process holding its own pack, index and engine; Ray's proxy spreads requests
over them and, with `max_replicas`, Ray's autoscaler adds and removes replicas with the load. The `scale` extra.

    retrv serve INDEX --pack PACK --ray --replicas 2 [--max-replicas 4] [--host 127.0.0.1 --port 8080]

Each replica is built from paths, not objects: the pack and index are opened (and verified) inside the replica,
so nothing large is pickled across processes. An index whose vectors are in Milvus Lite (`INDEX/vectors.db`)
cannot be shared by replicas (Milvus Lite allows one process per database file): serve a `milvus://` index, or
an hnsw one, instead (docs/SCALE.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from retrv.runtime.errors import InputError, require

log = logging.getLogger(__name__)

APP_NAME = "retrv"
TARGET_ONGOING_REQUESTS = 2  # autoscaling: a replica runs one query at a time (workers=1) plus about one waiting


def check_shareable(index) -> None:
    """Refuse an index that several processes cannot open at once (its vectors in Milvus Lite)."""
    if index is not None and index.meta.store == "milvus" and index.meta.vectors["uri"] == "vectors.db":
        raise InputError(f"serve --ray: {index.path} keeps its vectors in Milvus Lite ({index.path}/vectors.db), "
                         f"which one process at a time may open; expected an hnsw index or a milvus:// server one "
                         f"(`retrv index migrate {index.path} --to milvus://HOST:PORT`)")


def application(pack_path: str | os.PathLike, index_path: str | os.PathLike | None = None, *, replicas: int = 1,
                max_replicas: int | None = None, cpus_per_replica: float = 1.0, **app_kwargs):
    """The Ray Serve application (`Deployment.bind()`): `replicas` copies of `create_app(pack, index, **app_kwargs)`,
    or, with `max_replicas`, between `replicas` and `max_replicas` under Ray's autoscaler."""
    serve = require("ray.serve", "scale")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InputError(f"replicas: got {replicas!r}; expected an integer >= 1")
    if max_replicas is not None and (not isinstance(max_replicas, int) or max_replicas < replicas):
        raise InputError(f"max_replicas: got {max_replicas!r}; expected an integer >= replicas ({replicas})")

    @serve.ingress()
    class RetrvReplica:
        def __init__(self, pack: str, index: str | None, kwargs: dict) -> None:
            self._args = (pack, index, kwargs)

        def __serve_build_asgi_app__(self):
            from retrv.app.serve import create_app

            pack, index, kwargs = self._args
            return create_app(pack, index, **kwargs)

    scaling = {"num_replicas": replicas} if max_replicas is None else {"autoscaling_config": {
        "min_replicas": replicas, "max_replicas": max_replicas, "target_ongoing_requests": TARGET_ONGOING_REQUESTS}}
    deployment = serve.deployment(RetrvReplica, name="RetrvReplica", ray_actor_options={"num_cpus": cpus_per_replica},
                                  **scaling)
    return deployment.bind(str(Path(pack_path)), None if index_path is None else str(Path(index_path)), app_kwargs)


def start(pack_path, index_path=None, *, host: str = "127.0.0.1", port: int = 8080, address: str | None = None,
          num_cpus: int | None = None, **kwargs):
    """Start (or join, with `address`) a Ray cluster, start Serve's HTTP proxy on host:port and deploy; returns when
    every replica is up. The caller stops it with `stop()`."""
    ray = require("ray", "scale")
    serve = require("ray.serve", "scale")
    if not ray.is_initialized():
        if address is None:  # a local cluster: head on loopback, this machine's cores
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(pack_path, index_path, **kwargs), name=APP_NAME, route_prefix="/")


def stop() -> None:
    ray = require("ray", "scale")
    serve = require("ray.serve", "scale")
    serve.shutdown()
    ray.shutdown()


def serve_ray(pack_path, index_path=None, **kwargs) -> None:
    """`retrv serve --ray`: deploy, then wait until SIGINT/SIGTERM."""
    import signal
    import threading

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    start(pack_path, index_path, **kwargs)
    try:
        done.wait()
    finally:
        stop()

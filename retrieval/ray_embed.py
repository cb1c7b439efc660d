"""Batch embedding on Ray (compute.engine: ray): the catalog rows go through a Ray Data pipeline
whose map_batches stage is an actor pool holding the embedder, one actor per GPU of the cluster
(else compute.ray.actors CPU actors). Each actor loads the checkpoint once, reads and decodes its
batch's images exactly as the in-process path does (evaluation.retrieval.encode_gallery:
PIL open + convert RGB) and encodes them with their titles, so the vectors are the same (to float
tolerance) and come back in row order (the position column travels through the pipeline).

Where it runs: compute.ray.address (host:port of a cluster's GCS, ray://host:10001, or auto), else
RAY_ADDRESS, else a local Ray started for the call (and shut down after it). A Ray the caller
initialised already is used as it is. The cluster's nodes need this project installed and the
catalog images and the checkpoint at the same paths (a shared filesystem)."""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
from contextlib import contextmanager

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"
COLUMNS = ("image", "title", "position")   # absolute image path, title (None: image only), row position
BLOCKS_PER_ACTOR = 8   # input blocks per actor: enough to balance the pool, few enough to stay cheap


class RayUnavailable(ConnectionError):
    """compute.engine is ray but the Ray cluster named cannot be reached."""


class _Embedder:
    """A Ray Data callable class: one per actor, holding the loaded embedder."""

    def __init__(self, model_path: str, dim: int, feature_cache: str | None = None):
        import torch

        from core.console import quiet_libraries
        from training.backbone import MLLMEmbedder
        from training.vlm import use_feature_cache

        quiet_libraries()
        if feature_cache:   # the driver's frozen-tower feature cache (a shared path on a cluster)
            use_feature_cache(feature_cache)
        self.dim = int(dim)
        self.embedder = MLLMEmbedder.from_pretrained(model_path).eval()
        if torch.cuda.is_available():   # a GPU actor: Ray set CUDA_VISIBLE_DEVICES to its one GPU
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # float32 as on a CPU
            self.embedder.to("cuda")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        ims = [Image.open(p).convert("RGB") for p in batch["image"]]
        titles = [t if isinstance(t, str) else None for t in batch["title"]]
        emb = self.embedder.encode(ims, titles, batch_size=len(ims), dim=self.dim)
        return {"position": np.asarray(batch["position"], dtype=np.int64), "embedding": emb}


def _reachable(address: str, timeout: float = 5.0) -> None:
    """RayUnavailable unless a host:port address accepts a TCP connection (ray.init itself retries an
    unreachable GCS for minutes); `auto` and ray:// addresses are left to ray.init."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RayUnavailable(f"compute.engine is ray but the Ray cluster at {address!r} cannot be reached "
                             f"({e}); start it (`ray start --head`) or set compute.ray.address / "
                             f"{ADDRESS_ENV} to a running cluster (null and unset: a local Ray)") from None


def _quiet_data() -> None:
    """Ray Data's progress bars only where the project's own bars show (core.console.progress: not
    quiet, stderr a terminal); its per-run plan and stats lines off; Ray's loggers at WARNING."""
    import ray.data

    from core.console import is_quiet

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not is_quiet() and sys.stderr.isatty()
    ctx.enable_auto_log_stats = False
    ctx.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, ...": said once a process, about the choice just made
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextmanager
def ray_session(ray_cfg: dict):
    """Ray, initialised for the block: the caller's when ray.is_initialized(), else a connection to
    compute.ray.address / RAY_ADDRESS, else a new local instance; what is started here is shut
    down at the end. Ray's own logging at WARNING; workers' output reaches the console unless quiet."""
    import ray

    from core.console import is_quiet

    if ray.is_initialized():
        yield ray
        return
    address = ray_cfg.get("address") or os.environ.get(ADDRESS_ENV) or None
    if address:
        _reachable(address)
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=not is_quiet(), include_dashboard=False,
                  configure_logging=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:   # "local": never join a stale cluster recorded under /tmp/ray
            ray.init(address="local", **kwargs)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        raise RayUnavailable(f"compute.engine is ray but the Ray cluster at {address or 'local'!r} cannot be "
                             f"reached: {e}") from e
    try:   # from here on, whatever fails shuts down what was started
        res = ray.cluster_resources()
        log.info("ray: %s, %d CPUs, %d GPUs", address or "a local instance", res.get("CPU", 0), res.get("GPU", 0))
        yield ray
    finally:
        ray.shutdown()


def pool_args(ray, ray_cfg: dict) -> tuple[int, dict]:
    """(actors, map_batches resources per actor) of the embedder's actor pool: one actor per GPU of
    the cluster (num_gpus=1), else compute.ray.actors one-CPU actors (at most the cluster's CPUs)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1}
    actors, cpus = max(1, int(ray_cfg.get("actors") or 1)), int(res.get("CPU", 0))
    if cpus and actors > cpus:
        log.warning("compute.ray.actors is %d but the Ray cluster has %d CPUs: %d actors", actors, cpus, cpus)
        actors = cpus
    return actors, {"num_cpus": 1}


def embed_with_ray(rows: pd.DataFrame, model_path: str, dim: int, batch_size: int, ray_cfg: dict) -> np.ndarray:
    """float32 [len(rows), dim] embeddings of rows (columns image: an image file, title, position:
    0..N-1), row i at position i, by the checkpoint in model_path, on Ray (see the module doc)."""
    from training.vlm import FEATURE_CACHE_ENV

    missing = set(COLUMNS) - set(rows.columns)
    if missing:
        raise ValueError(f"rows lack the columns {sorted(missing)}")
    n = len(rows)
    out = np.zeros((n, int(dim)), dtype=np.float32)
    if n == 0:
        return out
    rows = rows[list(COLUMNS)].reset_index(drop=True).astype({"image": str, "position": np.int64})
    batch_size = max(1, int(batch_size))
    cache = os.environ.get(FEATURE_CACHE_ENV)   # set by use_feature_cache
    with ray_session(ray_cfg) as ray:
        _quiet_data()
        actors, resources = pool_args(ray, ray_cfg)
        # blocks of whole batches: at the same batch size, batch i holds encode_gallery's batch i
        batches = math.ceil(n / batch_size)
        step = batch_size * math.ceil(batches / min(batches, BLOCKS_PER_ACTOR * actors))
        parts = [rows.iloc[s:s + step] for s in range(0, n, step)]
        ds = ray.data.from_pandas(parts).map_batches(
            _Embedder, fn_constructor_kwargs={"model_path": str(model_path), "dim": int(dim),
                                              "feature_cache": cache},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            **resources)
        seen = np.zeros(n, dtype=bool)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            pos = batch["position"]
            out[pos] = batch["embedding"]
            seen[pos] = True
    if not seen.all():
        raise RuntimeError(f"Ray returned embeddings for {int(seen.sum())} of {n} rows")
    return out


def ray_engine(model_path: str, ray_cfg: dict):
    """An encode_gallery engine, (rows, dim, batch_size) -> embeddings, on Ray with compute.ray's
    settings (its batch_size, when set, wins over the caller's)."""
    def engine(rows: pd.DataFrame, dim: int, batch_size: int) -> np.ndarray:
        return embed_with_ray(rows, model_path, dim, ray_cfg.get("batch_size") or batch_size, ray_cfg)
    return engine

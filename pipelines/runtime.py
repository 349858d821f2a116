"""What touches Ray, and nothing else: starting it, the one actor wrapper, mapping a prepared stage over a dataset
(an actor pool when its plan declares a GPU, tasks otherwise), making datasets of a source's items, and draining a
dataset on the driver. The driver (pipelines/driver.py) decides what runs; this module only runs it.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import warnings

import numpy as np

from ops.stage import Plan, objects
from pipelines import faults
from pipelines.io import Damaged, StorageError
from pipelines.lock import LeaseLost

RETRIES = 3  # a crashed task or actor is retried this many times, then its job fails (never retried forever)
# Ray 2.60 has no named parameters for retries yet (it warns that free remote args go away in 2.64).
TASK_RETRIES = {"max_retries": RETRIES}
ACTOR_RETRIES = {"max_restarts": RETRIES, "max_task_retries": RETRIES}
NO_PROGRESS_TIMEOUT = 1800  # s without progress before Ray Data gives up (a GPU node may take minutes to join)


def init_ray() -> None:
    """Local Ray sized so reads are never starved by the actor pool (notes: the 2-CPU hang), or the cluster at
    RAY_ADDRESS; canonical tensor columns; quiet logs."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray
    import ray.data
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

    # after importing ray, whose own filter would otherwise come first (see TASK_RETRIES)
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")

    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **quiet)
        else:
            try:
                ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                         object_store_memory=512 * 1024**2, **quiet)
            except ValueError as exc:  # a cluster started with `ray start` on this machine: join it as it is
                if "existing cluster" not in str(exc):
                    raise
                ray.init(**quiet)
    route_ray_logs()
    ctx = ray.data.DataContext.get_current()
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT
    ctx.raise_original_map_exception = True  # a task's LeaseLost / StorageError / Damaged keeps its class


def driver_log_path() -> str:
    """Where this process's Ray log lines go instead of the terminal (the CLI sends Ray's native stderr there too)."""
    return os.path.join(tempfile.gettempdir(), "latentray-logs", f"driver-{os.getpid()}.log")


def route_ray_logs() -> None:
    """Ray's Python log lines leave the terminal: Ray Data's go only to its own file in the session logs (it writes
    them there anyway), the rest of Ray's to `driver_log_path()`."""
    os.makedirs(os.path.dirname(driver_log_path()), exist_ok=True)
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
    ray_logger = logging.getLogger("ray")
    if not any(isinstance(h, logging.FileHandler) for h in ray_logger.handlers):
        ray_logger.addHandler(logging.FileHandler(driver_log_path()))


def cluster_gpus() -> tuple[int, int]:
    """(GPUs in the cluster now, most GPUs its autoscaler can add up to; 0 without an autoscaler)."""
    import ray

    now = int(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state  # the autoscaler's node types (what Ray Data itself reads)

        most = int((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception:
        most = 0
    return now, max(now, most)


def can_add_nodes() -> bool:
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() is not None
    except Exception:
        return False


def cluster_hosts() -> int:
    """Hosts of the cluster now, or -1 when its autoscaler may add more (a local output would scatter)."""
    import ray

    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    return -1 if can_add_nodes() else len(hosts)


def cpu_actor_threads(actors: int) -> int:
    """Intra-op threads (and declared CPUs) of each CPU model actor: the cores of the smallest node, shared by the
    actors that may land on it, and never all of its logical CPUs (one stays free for the read, decode/align and
    write tasks: without it the pipeline starves; notes: the 2-CPU hang). On one machine the cores are the physical
    ones: local Ray over-commits its logical CPUs so those tasks always find a slot, and actors never
    oversubscribe the cores."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    logical = int(min(n["Resources"]["CPU"] for n in nodes)) if nodes else 1
    one_host = len({n["NodeManagerAddress"] for n in nodes}) <= 1
    cores = min(logical - 1, os.cpu_count() or 1) if one_host else logical - 1
    return max(1, cores // max(1, actors))


def pool(size: int):
    """An autoscaling actor pool (1..size) whose UDF runs on each actor's main thread, one call at a time: the
    thread its models were set up on. Ray Data's default hands every call to a second thread, where oneDNN's
    multi-threaded convolutions ran 2.5x slower than on the thread that set them up (BENCHMARKS.md)."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(min_size=1, max_size=size, enable_true_multi_threading=True,
                             max_concurrent_calls_per_actor=1)


def actor_pool(plan: Plan, device: str = "auto", actors: int | None = None, resources: dict | None = None
               ) -> tuple[dict, str]:
    """(map_batches arguments, device for setup) of a stage whose plan declares a GPU. GPU actors declare one GPU
    each and scale from one to as many as the cluster has or its autoscaler can add; CPU actors declare the CPUs
    whose threads they use (cpu_actor_threads)."""
    now, most = cluster_gpus() if device != "cpu" else (0, 0)
    extra = {"resources": dict(resources)} if resources else {}
    if device == "cuda" or (device == "auto" and most):
        size = actors or max(most, 1)
        return {"compute": pool(size), "num_gpus": plan.resources.num_gpus or 1,
                "num_cpus": plan.resources.num_cpus, **ACTOR_RETRIES, **extra}, "auto"
    size = actors or 1
    return {"compute": pool(size), "num_cpus": cpu_actor_threads(size), **ACTOR_RETRIES, **extra}, "cpu"


def apply(stage, plan: Plan, batch: dict) -> dict:
    """A prepared stage on one batch: its rows, or (aggregates) the batch's partial state, pickled."""
    if plan.kind == "aggregate":
        return {"state": objects([pickle.dumps(stage.partial(batch))])}
    return stage.process(batch)


class StageActor:
    """The one actor wrapper: a stage set up once per actor (models on its device), then batch after batch."""

    def __init__(self, stage, plan: Plan, device: str):
        import ray
        import torch

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))  # the CPUs this actor declared, no more (Ray also sets OMP's)
        self.stage, self.plan = stage, plan
        stage.setup(plan, device)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        faults.point("actor")
        out = apply(self.stage, self.plan, batch)
        if self.plan.kind != "aggregate":
            n = len(out["key"])
            out["_node"] = objects([self.node] * n)
            out["_rss_mb"], out["_gpu_mb"] = np.full(n, peak_rss_mb()), np.full(n, peak_gpu_mb())
        return out


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float:
    """Peak CUDA memory torch allocated in this process (MiB; 0 without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def run_task(batch: dict, stage, plan: Plan) -> dict:
    """A stage without models as a stateless task (its setup is cheap by contract)."""
    faults.point("task")
    stage.setup(plan, "cpu")
    return apply(stage, plan, batch)


def map_stage(ds, stage, plan: Plan, batch_size: int | None = None, device: str = "auto", actors: int | None = None,
              resources: dict | None = None):
    batch_size = batch_size or plan.batch_size
    if plan.on_actors:
        args, where = actor_pool(plan, device, actors, resources)
        return ds.map_batches(StageActor, fn_constructor_kwargs={"stage": stage, "plan": plan, "device": where},
                              batch_size=batch_size, **args)
    return ds.map_batches(run_task, fn_kwargs={"stage": stage, "plan": plan}, batch_size=batch_size,
                          num_cpus=plan.resources.num_cpus, **TASK_RETRIES)


def dataset(items: list[dict], expand=None, expand_args: dict | None = None):
    """A dataset of a source's items (rows; or parts to read, when `expand` turns one into rows)."""
    import ray.data

    ds = ray.data.from_items(items)
    if expand is not None:
        ds = ds.map_batches(expand, fn_kwargs=expand_args or {}, batch_size=1, **TASK_RETRIES)
    return ds


def write(ds, write_batch, kwargs: dict):
    """The last task of a row stage: `write_batch` on every batch as it comes (one part each)."""
    return ds.map_batches(write_batch, fn_kwargs=kwargs, batch_size=None, num_cpus=1, **TASK_RETRIES)


class StageFailed(RuntimeError):
    """The Ray job of a stage failed (e.g. an actor crashing on every retry); the message names the stage."""


OUR_ERRORS = (LeaseLost, StorageError, Damaged)  # raised in a task, reported as they are, without Ray's text


def drain(ds, on_row, stage: str) -> None:
    """Run a dataset to the end on the driver, handing each row to `on_row` as it comes. A lost lease, a storage
    failure or damage raised in a task is raised again as itself; anything else as StageFailed naming the stage
    (Ray's errors name tasks and actors, not what the user ran)."""
    try:
        for row in ds.iter_rows():
            on_row(row)
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc  # Ray re-raises a task's error with its class (see init_ray)
        for kind in OUR_ERRORS:
            if isinstance(cause, kind):
                raise kind(str(cause).split("\nFailed to apply UDF")[0]) from None
        raise StageFailed(f"stage {stage} failed: {type(exc).__name__}: {exc}") from exc

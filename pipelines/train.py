"""`latentray train-encoder`: ops/train_encoder.py's steps on Ray Train workers (TorchTrainer, DDP: NCCL on GPUs,
gloo on CPUs). This module only runs them: where data comes from, checkpoints, resume and the files written.

Output layout:
  <out>/training-<fingerprint>/step-NNNNNNN/state.pt   model + optimiser + history (Ray Train's checkpoints; the
                                                       last `keep_checkpoints` kept)
  <out>/encoder.pt      the trained encoder (`invert --encoder`, or `--basecode-encoder` for kind base_code)
  <out>/training.json   options, fingerprint, history, validation per checkpoint, throughput, resumes
  <out>/training.png    the curves

Invariants: one run writes an output at a time (its lease); the same command after a kill or a lost worker goes on
from the last checkpoint (its step, model and optimiser state), drawing exactly the batches the lost run would have;
other options never mix into a run: they train under their own fingerprint's folder, and the top-level files of
another run are replaced only with `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from ops.train_encoder import EncoderTrainConfig
from pipelines import faults, io

STATE_FILE = "state.pt"
PHOTO_COLUMN = "aligned"  # the photos of an ingest output


@dataclass(frozen=True)
class TrainOptions:
    generator: str = ""  # the generator checkpoint the encoder is trained for ("": the bundled one)
    photos: str = ""  # an ingest output whose ok rows' aligned photos mix into each batch (wplus; photo_fraction)
    identity: str = ""  # ArcFace checkpoint: adds e4e's identity loss (faces)
    workers: int = 2  # Ray Train workers (data-parallel replicas)
    cpus_per_worker: int = 1  # CPUs each worker declares; its torch threads
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: one GPU per worker when the cluster has GPUs
    checkpoint_every: int = 100  # steps between checkpoints (with validation)
    keep_checkpoints: int = 3  # newest checkpoints kept
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the run fails
    overwrite: bool = False  # replace the encoder and training.json of a run with other options


def fingerprint(cfg: EncoderTrainConfig, opts: TrainOptions, generator_sha: str) -> str:
    """What makes two trainings the same run (resumable into each other); workers and checkpointing are not."""
    what = {"config": dataclasses.asdict(cfg.resolved()), "generator": generator_sha, "photos": opts.photos,
            "identity": opts.identity}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----- on each worker ------------------------------------------------------------------------------------------
def latest_state(folder: str, device="cpu") -> dict | None:
    """The newest checkpoint under `folder` that loads whole. Ray Train's own latest checkpoint may be older: a
    report reaches its controller at the next poll (every 2 s), so a worker killed just after reporting loses that
    checkpoint from Ray's list although its files were written (measured: a kill 4 steps after a report restarted
    from scratch). A file cut short by a kill does not load, and the one before it is taken."""
    import torch

    fs, root = io.url_to_fs(folder)
    for name in sorted(io.listing(fs, root), reverse=True):  # fresh (no listing cache), retried
        if not name.startswith("step-"):
            continue
        try:
            data = io.read_file(f"{folder.rstrip('/')}/{name}/{STATE_FILE}")
            return torch.load(_io.BytesIO(data), map_location=device, weights_only=True)
        except Exception:  # absent or cut short: an older checkpoint
            continue
    return None



class PhotoStream:
    """This worker's share of an ingest output's ok images, part by part (one part in memory), cycled. A resumed
    worker starts its share again from the first part (photo batches, unlike generator samples, are not replayed)."""

    def __init__(self, out_dir: str, rank: int, world: int, size: int):
        from pipelines import index

        self.out_dir, self.rank, self.world, self.size = out_dir, rank, world, size
        self.state = index.load(out_dir)
        self.plan = index.plan_reads(self.state)
        self.buffer, self.part = [], 0

    def _fill(self) -> None:
        from pipelines import index

        for _ in range(len(self.plan) + 1):
            part, keep = self.plan[self.part % len(self.plan)]
            self.part += 1
            table = index.read_planned(self.out_dir, part, keep, self.state.parts[part]["size"],
                                       ["status", PHOTO_COLUMN])
            cols = io.columns_of(table)
            ok = [i for i, s in enumerate(cols["status"]) if s == "ok"]
            self.buffer += [cols[PHOTO_COLUMN][i] for i in ok[self.rank::self.world]]
            if self.buffer:
                return
        raise ValueError(f"{self.out_dir}: no ok photo for worker {self.rank} of {self.world}")

    def take(self, n: int):
        from ops.train_encoder import photos_to_tensor

        while len(self.buffer) < n:
            self._fill()
        chosen, self.buffer = self.buffer[:n], self.buffer[n:]
        return photos_to_tensor(chosen, self.size)


def worker_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: resume from the last checkpoint, then step, checkpointing every N."""
    import ray.train
    import torch
    import torch.distributed as dist

    from ops.latents import generator_on
    from ops.train_encoder import EncoderTraining

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    G = generator_on(config["generator"], str(device)).requires_grad_(False)
    identity = None
    if config["identity"]:
        from models.identity import load_arcface

        identity = load_arcface(config["identity"], device)
    training = EncoderTraining(G, EncoderTrainConfig(**config["train"]), identity=identity)
    cfg = training.cfg
    model = training.new_model()
    optimizer = training.optimizer(model)
    step, history, resumes = 0, [], []
    state = latest_state(config["checkpoints"], device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, resumes = state["step"], json.loads(state["history"]), json.loads(state["resumes"])
        resumes.append(step)
    wrapped = model
    if world > 1:  # e4e's progressive stages leave the later style blocks unused early on
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg.kind == "wplus")
    photos = PhotoStream(config["photos"], rank, world, G.size) if config["photos"] else None
    n_photos = training.photo_count(photos is not None)
    stepping, began = 0.0, step
    while step < cfg.steps:
        faults.point("train_step")
        t0 = time.perf_counter()
        batch = photos.take(n_photos) if photos is not None and n_photos else None
        parts = training.step(wrapped, optimizer, step, rank, batch)
        stepping += time.perf_counter() - t0
        step += 1
        history.append({"step": step, **{k: round(v, 6) for k, v in parts.items() if k != "digest"}})
        if step % config["checkpoint_every"] and step < cfg.steps:
            continue
        digests = [None] * world
        if world > 1:
            dist.all_gather_object(digests, parts["digest"])
        else:
            digests = [parts["digest"]]
        metrics = {"step": step, "loss": parts["loss"], "batch_digests": digests,
                   "samples_per_s": (step - began) * cfg.batch_size * world / max(stepping, 1e-9)}
        name = f"step-{step:07d}"
        if rank == 0:
            metrics.update(training.validate(model))
            history[-1].update({k: v for k, v in metrics.items() if k not in ("step", "loss")})
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "history": json.dumps(history), "resumes": json.dumps(resumes)},
                           os.path.join(folder, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint_dir_name=name)


# ----- on the driver -------------------------------------------------------------------------------------------
def storage(out_dir: str) -> tuple[str, object]:
    """(storage_path, pyarrow filesystem) for Ray Train's checkpoints under the output."""
    if io.is_local(out_dir):
        return os.path.abspath(out_dir), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, root = io.url_to_fs(out_dir)
    return root, PyFileSystem(FSSpecHandler(fs))


def scaling(opts: TrainOptions):
    import ray.train

    from pipelines.runtime import cluster_gpus

    use_gpu = opts.device == "cuda" or (opts.device == "auto" and cluster_gpus()[1] > 0)
    return ray.train.ScalingConfig(num_workers=opts.workers, use_gpu=use_gpu,
                                   resources_per_worker={"CPU": opts.cpus_per_worker, **({"GPU": 1} if use_gpu else {})})


def check(cfg: EncoderTrainConfig, opts: TrainOptions) -> None:
    """Bad options fail here, before Ray starts, naming the option."""
    cfg = cfg.resolved()
    for name in ("workers", "cpus_per_worker", "checkpoint_every", "keep_checkpoints"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(opts, name)}")
    if opts.max_failures < 0:
        raise ValueError(f"--max-failures must be 0 or more, got {opts.max_failures}")
    if opts.photos:
        from pipelines.sources import is_stage_output

        if cfg.kind != "wplus":
            raise ValueError("--photos: the base_code encoder trains on generator samples only (it needs their W+)")
        if not is_stage_output(opts.photos):
            raise ValueError(f"--photos {opts.photos}: not a latentray ingest output (no run.json)")
        from pipelines.sources import StageOutput

        if PHOTO_COLUMN not in StageOutput(opts.photos).stored_columns():
            raise ValueError(f"--photos {opts.photos}: no `{PHOTO_COLUMN}` column (an ingest output has one)")
        from pipelines import index

        ok = index.load(opts.photos).winners.column("status").to_pylist().count("ok")
        if ok < opts.workers:
            raise ValueError(f"--photos {opts.photos}: {ok} ok photos for {opts.workers} workers (each needs one)")
    if opts.identity and not os.path.exists(opts.identity):
        raise FileNotFoundError(f"--identity {opts.identity}: no such file")
    if cfg.lpips_weight and cfg.lpips_backbone == "imagenet":  # missing or wrong weights: named here, not in a worker
        from models.perceptual import backbone_bytes

        backbone_bytes(cfg.lpips_net)


def train(out_dir: str, cfg: EncoderTrainConfig, opts: TrainOptions) -> dict:
    """Train (or go on training) into `out_dir`; returns what training.json records."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from models.checkpoints import file_sha256
    from ops.latents import generator_path
    from pipelines.lock import OutputLock
    from pipelines.runtime import StageFailed, init_ray

    check(cfg, opts)
    io.refuse_credentials(out_dir, "--output")
    sha = file_sha256(generator_path(opts.generator))
    print_ = lambda text: print(f"train-encoder: {text}", flush=True)  # noqa: E731
    fp = fingerprint(cfg, opts, sha)
    with OutputLock(out_dir) as lock:
        previous = io.read_json(out_dir, "training.json")
        if previous and previous.get("fingerprint") != fp and not opts.overwrite:
            raise ValueError(f"{out_dir} holds an encoder trained with other options (fingerprint "
                             f"{previous.get('fingerprint')}, this run {fp}); pass --overwrite or another --output")
        init_ray()
        path, fs = storage(out_dir)
        name = f"training-{fp}"
        config = {"train": dataclasses.asdict(cfg), "generator": opts.generator, "photos": opts.photos,
                  "checkpoints": f"{out_dir.rstrip('/')}/{name}",
                  "identity": opts.identity, "checkpoint_every": opts.checkpoint_every,
                  "threads": opts.cpus_per_worker}
        trainer = TorchTrainer(
            worker_loop, train_loop_config=config, scaling_config=scaling(opts),
            run_config=ray.train.RunConfig(
                name=name, storage_path=path, storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=opts.keep_checkpoints)))
        print_(f"{opts.workers} worker{'s' * (opts.workers != 1)}, {cfg.steps} steps of {cfg.batch_size} images each -> {out_dir}")
        began = time.time()
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray Train's TrainingFailedError wraps the worker's own
            raise StageFailed(f"train-encoder failed: {type(exc).__name__}: {exc}") from None
        lock.check()
        record = finish(out_dir, cfg, opts, config["checkpoints"], fp, sha, time.time() - began)
    print_(f"encoder {record['encoder']} (validation PSNR {record['validation'][-1].get('val_psnr', float('nan')):.2f} "
           f"dB, w_avg start {record['validation'][-1].get('start_psnr', float('nan')):.2f} dB) in "
           f"{record['seconds']:.0f} s")
    return record


def finish(out_dir: str, cfg, opts: TrainOptions, checkpoints: str, fp: str, sha: str, seconds: float) -> dict:
    """Write the encoder, training.json and the curves from the last checkpoint."""
    from ops.latents import generator_on
    from ops.train_encoder import EncoderTraining, plot_curves

    state = latest_state(checkpoints)
    if state is None or state["step"] < cfg.steps:
        raise RuntimeError(f"{checkpoints}: training ended without its final checkpoint")
    G = generator_on(opts.generator, "cpu")
    training = EncoderTraining(G, cfg)
    model = training.new_model()
    model.load_state_dict(state["model"])
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, "encoder.pt")
        training.save(model, local)
        with open(local, "rb") as f:
            data = f.read()
    encoder = io.write_bytes(out_dir, "encoder.pt", data)
    history = json.loads(state["history"])
    record = {"fingerprint": fp, "generator_sha256": sha, "config": dataclasses.asdict(training.cfg),
              "options": dataclasses.asdict(opts), "steps": state["step"], "resumed_from": json.loads(state["resumes"]),
              "encoder": encoder, "encoder_sha256": hashlib.sha256(data).hexdigest(), "seconds": seconds,
              "validation": [h for h in history if "val_psnr" in h], "history": history}
    io.write_bytes(out_dir, "training.png", plot_curves(history))
    io.write_json(out_dir, "training.json", record)
    return record

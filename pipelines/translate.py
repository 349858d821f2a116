"""The `translate` stage: a CycleGAN generator over photos or over an image column of an earlier stage's output
(`aligned` of ingest, `image_png` of edit, ...), batched on the actor pool. Plumbing only: the network is in
models/cyclegan.py, the conventions in ops/translate.py."""

from __future__ import annotations

import time

import numpy as np

from pipelines import io
from pipelines.invert import TASK_RETRIES, actor_pool, drain, fingerprint, finish, init_ray, read_stage, versions, \
    write_batch


def decode_cell(value) -> np.ndarray:
    """An image cell: PNG/JPEG bytes or a uint8 [H, W, 3] array."""
    if isinstance(value, (bytes, bytearray)):
        from ops.images import decode_png

        return decode_png(value)
    return np.asarray(value, dtype=np.uint8)


def read_photos(batch: dict) -> dict:
    """Photos as input: read + decode each robustly (a bad file becomes a failed row); the decoded RGB travels on
    as lossless PNG bytes so every row has the same type whatever its size."""
    from ops.images import encode_png
    from ops.ingest import decode_row, read_bytes

    rows = []
    for key, uri in zip(batch["key"], batch["uri"]):
        try:
            data, error = read_bytes(uri), None
        except Exception as exc:
            data, error = None, f"{type(exc).__name__}: {exc}"
        rows.append(decode_row(key, data, read_error=error))
    out = {c: np.array([r[c] for r in rows], dtype=object) for c in ("key", "status", "error_code", "error")}
    out["image"] = io.objects([encode_png(r["image"]) if r["image"] is not None else b"" for r in rows])
    return out


class TranslateActor:
    def __init__(self, checkpoint: str, preprocess: str, load_size: int, device: str):
        from models.cyclegan import load_cyclegan
        from ops.invert_stage import resolve_device

        self.device = resolve_device(device)
        self.G = load_cyclegan(checkpoint, self.device)
        self.preprocess, self.load_size = preprocess, load_size

    def __call__(self, batch: dict) -> dict:
        import torch

        from ops.images import encode_png, thumbnail
        from ops.translate import preprocess, to_uint8_truncated

        n = len(batch["key"])
        status, code, error = (np.array(batch[c], dtype=object, copy=True) for c in ("status", "error_code", "error"))
        outputs = io.objects([b""] * n)
        originals = np.zeros((n, 64, 64, 3), np.uint8)
        results = np.zeros((n, 64, 64, 3), np.uint8)
        tensors = {}
        for i in np.flatnonzero(status == "ok"):
            image = decode_cell(batch["image"][i])
            originals[i] = thumbnail(image, 64)
            tensors[i] = preprocess(image, self.preprocess, self.load_size)
        by_shape = {}
        for i, t in tensors.items():  # `--preprocess none` keeps sizes: run each size as its own batch
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for rows in by_shape.values():
            with torch.no_grad():
                out = to_uint8_truncated(self.G(torch.stack([tensors[i] for i in rows]).to(self.device)))
            for i, image in zip(rows, out):
                outputs[i], results[i] = encode_png(image), thumbnail(image, 64)
        return {"key": batch["key"], "status": status, "error_code": code, "error": error,
                "translated_png": outputs, "original": originals, "recon_translated": results}


def run_translate(inputs: list[str], output: str, checkpoint: str, column: str = "",
                  preprocess: str = "resize_and_crop", load_size: int = 256, batch_size: int = 8, overwrite: bool = False, actors: int | None = None,
                  device: str = "auto", progress: bool = True) -> dict:
    """Translate every input (photos, or `column` of one stage output) with a CycleGAN generator."""
    import ray.data

    from models.checkpoints import file_sha256
    from models.cyclegan import load_cyclegan
    from ops.ingest import list_inputs
    from ops.translate import PREPROCESS

    t0 = time.time()
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    G = load_cyclegan(checkpoint)  # a wrong file fails here, before any row
    digest = file_sha256(checkpoint)
    upstream = io.read_json(inputs[0], "run.json") if len(inputs) == 1 else None
    if upstream and not column:
        raise ValueError(f"{inputs[0]} is a stage output: name its image column with --column (e.g. aligned, "
                         "image_png)")
    config = {"stage_name": "translate", "cyclegan": digest, "generator": G.config, "column": column,
              "preprocess": preprocess, "load_size": load_size, "upstream": upstream and upstream["fingerprint"]}
    fp = fingerprint(config)
    io.prepare_output(output, fp, overwrite)
    done = io.completed_keys(output)
    io.write_json(output, "run.json", {"stage": "translate", "fingerprint": fp, "config": config, "inputs": inputs,
                                       "started": t0, "versions": versions(),
                                       "checkpoints_sha256": {"cyclegan": digest}})
    init_ray()
    if upstream:
        ds = read_stage(inputs[0], ["key", "status", column])
        ds = ds.filter(lambda row: row["key"] not in done) if done else ds
        ds = ds.map_batches(lambda b: {"key": b["key"], "status": b["status"],
                                       "error_code": np.where(b["status"] == "ok", "", "source_not_ok"),
                                       "error": np.where(b["status"] == "ok", "", "source row not ok"),
                                       "image": b[column]}, batch_size=batch_size)
        total = len([k for k in io.read_dataset(inputs[0], ["key"]).column("key").to_pylist() if k not in done])
    else:
        todo = [{"key": k, "uri": u} for k, u in list_inputs(inputs) if k not in done]
        ds = ray.data.from_items(todo).map_batches(read_photos, batch_size=batch_size, num_cpus=1, **TASK_RETRIES) \
            if todo else None
        total = len(todo)
    if ds is not None and total:
        ds = ds.map_batches(TranslateActor, fn_constructor_kwargs=dict(checkpoint=checkpoint, preprocess=preprocess,
                                                                       load_size=load_size, device=device),
                            batch_size=batch_size, **actor_pool(actors))
        ds = ds.map_batches(write_batch, fn_kwargs={"output": output, "metadata": {"stage": "translate",
                                                                                "fingerprint": fp},
                                                    "preview_columns": ("original", "recon_translated"),
                                                    "preview_rows": 8},
                            batch_size=None, num_cpus=1, **TASK_RETRIES)
    return finish(output, t0, *drain(ds, "translate", total, progress), len(done))

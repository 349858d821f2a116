"""`latentray export`: the ok rows' latents of a stage output for tools outside latentray."""

from __future__ import annotations

import numpy as np

from pipelines import index, io


def export_latents(out_dir: str, dest: str, column: str = "wplus") -> int:
    """Write the ok rows' latents (the copy every reader sees, one per key): `.npz` (`keys`, `w` as NVIDIA's
    projector names its array) or `.pt` (rosinality projector style: {key: {"latent": tensor}}). Returns the
    number of rows."""
    if not dest.endswith((".npz", ".pt")):
        raise ValueError(f"export destination must end in .npz or .pt, got {dest}")
    table = index.read_dataset(out_dir, ["key", "status", column])
    ok = np.array([s == "ok" for s in table.column("status").to_pylist()], dtype=bool)
    keys = [k for k, good in zip(table.column("key").to_pylist(), ok) if good]
    latents = io.tensor(table, column)[ok] if len(table) else np.zeros((0,))
    if dest.endswith(".npz"):
        np.savez(dest, keys=np.array(keys), w=latents)
    else:
        import torch

        torch.save({k: {"latent": torch.from_numpy(np.ascontiguousarray(v))} for k, v in zip(keys, latents)}, dest)
    return len(keys)

"""Destylization throughput: image-steps/s of the batched destylizer against one portrait at a time, same seeded
companion models (bundled 64-px generator, Z+ encoder, ArcFace), same steps, same CPU, in one run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import machine_line, write_section  # noqa: E402
from models.companions import finetuned_copy, identity_net, zplus_encoder  # noqa: E402
from models.default_generator import load_default_generator  # noqa: E402
from ops.destylize import DestylizeConfig, destylize  # noqa: E402

STEPS = 20


def main() -> None:
    torch.set_num_threads(2)
    g = load_default_generator()
    models = (g, finetuned_copy(g), zplus_encoder(g))
    identity = identity_net()
    cfg = DestylizeConfig(steps=STEPS, lpips_net="alex", lpips_backbone="random")
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    portraits = torch.nn.functional.interpolate(x, size=256, mode="bilinear").tanh()
    keys = [f"p{i}" for i in range(8)]
    destylize(*models, portraits[:1], keys[:1], DestylizeConfig(steps=2, lpips_net="alex", lpips_backbone="random"))
    rows = ["| portraits | batched: image-steps/s | one at a time: image-steps/s | batched / loop |",
            "|---:|---:|---:|---:|"]
    for b in (4, 8):
        t0 = time.perf_counter()
        destylize(*models, portraits[:b], keys[:b], cfg, identity=identity)
        batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(b):
            destylize(*models, portraits[i:i + 1], keys[i:i + 1], cfg, identity=identity)
        loop = time.perf_counter() - t0
        rows.append(f"| {b} | {b * STEPS / batched:.1f} | {b * STEPS / loop:.1f} | {loop / batched:.2f}× |")
        print(rows[-1], flush=True)
    body = "\n".join([
        "## Destylization throughput (`benchmarks/bench_destylize.py`)",
        "",
        f"Machine: {machine_line()}. Bundled 64-px generator as g, a seeded g', Z+ encoder and ArcFace (untrained "
        f"companions), {STEPS} steps, LPIPS-alex (random backbone), identity term on. Times include the encoder and "
        "the final renders.",
        "",
        *rows,
        "",
        "On CPU the convolutions run image by image inside a batch (so a portrait's result does not depend on its "
        "batch); the gain comes from everything else running once per batch. On CUDA the batch is one call.",
    ])
    write_section("destylize", body)
    print(body)


if __name__ == "__main__":
    main()

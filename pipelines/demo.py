"""`make demo`: the real invert pipeline on bundled data — images sampled from the bundled generator, plus the same
images shifted by 1/8 of the width and rotated 10 degrees (out-of-range, known ground truth) — inverted in W+ and
F/W+, with a preview grid (originals | W+ | F/W+ reconstructions rendered back from the stored latents)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.default_generator import DEFAULT_GENERATOR_PATH, load_default_generator
from ops.geometry import similarity_warp
from ops.images import make_grid, to_uint8
from ops.invert_stage import InvertStageConfig
from ops.render import render
from pipelines.invert import run_invert
from pipelines.io import read_dataset

ENCODER = DEFAULT_GENERATOR_PATH.with_name("default_basecode_encoder_l16.pt")


def write_inputs(folder: Path, n: int = 4) -> None:
    G = load_default_generator()
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = G.synthesis(G.mapping(z))
    shifted = similarity_warp(images, degrees=10, shift=(0.125, 0.0), padding="reflection")
    for sub, batch in (("sampled", images), ("shifted", shifted)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(to_uint8(batch)):
            Image.fromarray(a).save(folder / sub / f"{i}.png")


def main(out: str = "out", steps: int = 300) -> None:
    out_dir = Path(out)
    inputs, latents = out_dir / "demo_inputs", out_dir / "latents"
    write_inputs(inputs)
    print("LPIPS: using a RANDOM AlexNet backbone (no ImageNet weights offline); numbers are labelled 'random'.")
    cfg = InvertStageConfig(spaces=("wplus", "fwplus"), steps=steps, lpips_net="alex", lpips_backbone="random",
                            basecode_encoder=str(ENCODER))
    stats = run_invert([str(inputs)], str(latents), cfg, batch_size=4, overwrite=True)
    table = read_dataset(str(latents)).sort_by("key")
    G = load_default_generator()
    cols = {c: table.column(c).combine_chunks().to_numpy_ndarray() for c in ("wplus", "fwplus_wplus",
                                                                                "fwplus_base_code")}
    originals = np.stack([np.asarray(Image.open(inputs / k)) for k in table.column("key").to_pylist()])
    recon_w = to_uint8(render(G, {"wplus": cols["wplus"]}, "wplus"))
    recon_f = to_uint8(render(G, {k: cols[k] for k in ("fwplus_wplus", "fwplus_base_code")}, "fwplus"))
    grid = np.stack([originals, recon_w, recon_f], axis=1).reshape(-1, *originals.shape[1:])
    (latents / "previews").mkdir(exist_ok=True)
    Image.fromarray(make_grid(grid, ncols=3)).save(latents / "previews" / "reconstructions.png")
    keys = table.column("key").to_pylist()
    for group in ("sampled", "shifted"):
        rows = [i for i, k in enumerate(keys) if k.startswith(group)]
        w = np.mean(table.column("wplus_psnr").to_numpy()[rows])
        f = np.mean(table.column("fwplus_psnr").to_numpy()[rows])
        print(f"{group:8s} images: PSNR W+ {w:.2f} dB, F/W+ {f:.2f} dB")
    print(f"rows {stats['by_status']}; latents in {latents}, previews in {latents / 'previews'}")
    print("The bundled generator is a small untrained StyleGAN2 (random textures, NOT a face model). For real work:\n"
          "  latentray invert --input photos/ --output out/latents --generator stylegan2-ffhq-config-f.pt")


if __name__ == "__main__":
    main(*sys.argv[1:2])

"""`make demo`: the real pipeline on bundled data, in two runs under out/:

- `faces`: public-domain portraits that ship inside scikit-image and matplotlib (plus one photo without a face)
  through ingest + FFHQ alignment (dlib 68 points) + inversion in W+ and F/W+;
- `synthetic`: images sampled from the bundled generator and the same images shifted by 1/8 of the width and rotated
  10 degrees (out-of-range, known ground truth), `--align none`, inverted in W+ and F/W+.

Each run writes Parquet parts, run.json, stats.json and previews (original | aligned | reconstruction per space)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.default_generator import DEFAULT_GENERATOR_PATH, load_default_generator
from ops.align import AlignConfig
from ops.geometry import similarity_warp
from ops.images import to_uint8
from ops.ingest import IngestConfig
from ops.invert import LOW_CONTRAST_F_WEIGHT, InvertConfig
from ops.invert_stage import InvertStageConfig
from pipelines.cli import native_stderr_to_log, summary_line
from pipelines.driver import RunOptions, run
from pipelines.index import read_dataset

ENCODER = DEFAULT_GENERATOR_PATH.with_name("default_basecode_encoder_l16.pt")


def astronaut() -> np.ndarray:
    """NASA portrait of Eileen Collins (public domain), shipped inside scikit-image."""
    from skimage import data

    return data.astronaut()


def grace_hopper() -> np.ndarray:
    """US Navy portrait of Grace Hopper (public domain), shipped inside matplotlib."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def write_face_photos(folder: Path) -> None:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(astronaut()).save(folder / "astronaut.png")
    Image.fromarray(grace_hopper()).save(folder / "grace_hopper.jpg", quality=95)
    Image.fromarray(data.coffee()).save(folder / "coffee_no_face.jpg", quality=95)


def write_synthetic(folder: Path, n: int = 4) -> None:
    G = load_default_generator()
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = G.synthesis(G.mapping(z))
    shifted = similarity_warp(images, degrees=10, shift=(0.125, 0.0), padding="reflection")
    for sub, batch in (("sampled", images), ("shifted", shifted)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(to_uint8(batch)):
            Image.fromarray(a).save(folder / sub / f"{i}.png")


def report(output: Path, stats: dict) -> None:
    table = read_dataset(str(output), ["key", "status", "wplus_psnr", "fwplus_psnr"])
    keys, status = table.column("key").to_pylist(), table.column("status").to_pylist()
    groups = sorted({k.split("/")[0] if "/" in k else "photos" for k in keys})
    for group in groups:
        rows = [i for i, k in enumerate(keys) if (k.split("/")[0] if "/" in k else "photos") == group
                and status[i] == "ok"]
        if rows:
            w = np.mean(table.column("wplus_psnr").to_numpy()[rows])
            f = np.mean(table.column("fwplus_psnr").to_numpy()[rows])
            print(f"  {output.name}/{group}: {len(rows)} ok, mean PSNR W+ {w:.2f} dB, F/W+ {f:.2f} dB")
    print(f"{output.name}: {summary_line(stats)} in {stats['seconds']:.0f} s")


def main(out: str = "out", steps: int = 300) -> None:
    out_dir = Path(out)
    inputs = out_dir / "demo_inputs"
    write_face_photos(inputs / "faces")
    write_synthetic(inputs / "synthetic")
    print("LPIPS: using a RANDOM AlexNet backbone (no ImageNet weights offline); numbers are labelled 'random'.")
    # BDInvert's recipe with the base-code anchor recommended for low-contrast generators (ops/invert.py,
    # LOW_CONTRAST_F_WEIGHT; chosen by benchmarks/bench_bdinvert.py on a tuning set).
    cfg = InvertStageConfig(spaces=("wplus", "fwplus"), basecode_encoder=str(ENCODER),
                            invert=InvertConfig(steps=steps, lpips_net="alex", lpips_backbone="random",
                                                optimize_noise=False, f_weight=LOW_CONTRAST_F_WEIGHT))
    pages = []
    for name, align in (("faces", "ffhq"), ("synthetic", "none")):
        output = out_dir / name
        stats = run("invert", [str(inputs / name)], str(output), cfg, IngestConfig(alignment=AlignConfig(align)),
                    RunOptions(batch_size=4, overwrite=True))
        # (a rerun with the same configuration resumes: nothing left to do)
        report(output, stats)
        pages.append(stats.get("report"))
    print("The bundled generator is a small untrained StyleGAN2 (random textures, NOT a face model): the faces run\n"
          "shows alignment and the pipeline, not face inversion quality. For real work:\n"
          "  latentray invert --input photos/ --output out/latents --generator stylegan2-ffhq-config-f.pt")
    print("Open the reports (one self-contained page each; no network needed):")
    for page in pages:
        print(f"  {Path(page).resolve() if page else 'not written (see the warning above)'}")


if __name__ == "__main__":
    with native_stderr_to_log():  # Ray's native log lines to a file, as the CLI does
        main(*sys.argv[1:2])

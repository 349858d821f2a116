"""What each newer stage costs per row: the stage's own `process` on a warm worker (setup done, no Ray), timed in
one process on this machine. Import (latents -> rows), paste-back (decode the photo, warp, feather, PNG), pix2pix
and CycleGAN translation at the official sizes (random weights: speed does not depend on them), masked against
unmasked inversion at one budget, and DCI per code row (one lasso per factor)."""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks.report import machine_line, ok_rows, write_section  # noqa: E402
from ops.stage import Context, objects  # noqa: E402

STEPS = 50  # inversion budget (both masked and unmasked)


def rows(n: int, **columns) -> dict:
    """A batch of n ok rows with these columns."""
    return ok_rows([f"r{i}" for i in range(n)], **columns)


def per_row(stage, batch: dict, repeats: int = 2) -> float:
    """Best of `repeats` seconds per row of `stage.process(batch)` (the first call also warms caches)."""
    stage.process(batch)
    n, best = len(batch["key"]), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = stage.process(batch)
        best = min(best, time.perf_counter() - t0)
    assert list(out["status"]) == ["ok"] * n, (stage.name, list(out["error"])[:2])
    return best / n


def ready(stage):
    return stage.ready(Context())


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def bench_import(G) -> float:
    from ops.import_latents import ImportConfig, ImportStage

    wplus = G.to_wplus(G.mapping(torch.randn(256, G.style_dim))).numpy()
    return per_row(ready(ImportStage(ImportConfig())), rows(256, latent=list(wplus)))


def bench_paste(tmp: Path) -> float:
    from corpus import face_corpus
    from ops.align import AlignConfig, align_image
    from ops.paste import PasteConfig, PasteStage

    (tmp / "face.png").write_bytes(face_corpus()["face.png"][0])
    photo = np.asarray(Image.open(tmp / "face.png").convert("RGB"))
    aligned = align_image(photo, 256, AlignConfig("ffhq"))
    n = 8
    batch = rows(n, aligned=objects([png(aligned.image)] * n), uri=objects([str(tmp / "face.png")] * n),
                 align_transform=[aligned.transform] * n, landmarks=[aligned.landmarks] * n)
    return per_row(ready(PasteStage(PasteConfig(column="aligned"))), batch)


def bench_translate(tmp: Path, net: torch.nn.Module, name: str, **options) -> float:
    from ops.translate import TranslateConfig, TranslateStage

    path = tmp / f"{name}.pth"
    torch.save(net.state_dict(), path)
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)
    stage = ready(TranslateStage(TranslateConfig(translator=str(path), **options)))
    return per_row(stage, rows(4, image=objects([png(image)] * 4)), repeats=1)


def bench_inversion(G, masked: bool) -> float:
    from ops.invert import InvertConfig
    from ops.invert_stage import InvertStage, InvertStageConfig

    n = 4
    with torch.no_grad():
        images = G.synthesis(G.to_wplus(G.mapping(torch.randn(n, G.style_dim, generator=torch.Generator()
                                                              .manual_seed(7)))))
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    columns = {"image": list(pixels)}
    if masked:
        mask = np.full(pixels.shape[1:3], 255, np.uint8)
        mask[G.size // 4: G.size // 2, G.size // 4: 3 * G.size // 4] = 0  # a hole over a quarter of the height
        columns["mask"] = [mask] * n
    cfg = InvertStageConfig(invert=InvertConfig(steps=STEPS, lpips_net="alex", lpips_backbone="random",
                                                optimize_noise=False))
    return per_row(ready(InvertStage(cfg)), rows(n, **columns), repeats=1)


def bench_dci(G) -> dict[str, float]:
    from ops.dci import dci

    n, out = 2000, {}
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(n, 6))
    dci(rng.normal(size=(100, 8)), factors[:100])  # imports and first-call costs
    for space, dims in (("w", G.style_dim), ("s", G.n_styles)):
        codes = rng.normal(size=(n, dims))
        t0 = time.perf_counter()
        dci(codes, factors)
        out[space] = (time.perf_counter() - t0) / n
    return out


def main() -> None:
    from models.default_generator import load_default_generator
    from models.translation import ResnetGenerator, UnetGenerator

    torch.set_num_threads(2)
    G = load_default_generator()
    costs = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        costs["import (W+ latents → rows)"] = bench_import(G)
        costs["paste (256-px face into a 512×512 photo, PNG out)"] = bench_paste(tmp)
        unet = UnetGenerator.official(num_downs=8, dropout=True)
        costs["translate pix2pix unet_256, --eval (batched)"] = bench_translate(tmp, unet, "unet")
        costs["translate pix2pix unet_256, batch stats + dropout (one row per call)"] = bench_translate(
            tmp, unet, "unet", batch_stats=True, dropout=True)
        costs["translate CycleGAN resnet_9blocks 256 px"] = bench_translate(tmp, ResnetGenerator(), "resnet")
    for masked in (False, True):
        costs[f"invert W+ {G.size} px, {STEPS} steps, {'masked' if masked else 'unmasked'}"] = \
            bench_inversion(G, masked)
    for space, seconds in bench_dci(G).items():
        costs[f"dci, {space.upper()} codes ({G.style_dim if space == 'w' else G.n_styles} dims), per code row"] = \
            seconds
    table = ["| stage | ms per row |", "|---|---:|", *(f"| {k} | {v * 1e3:.2f} |" for k, v in costs.items())]
    body = "\n".join([
        "## Per-row cost of the newer stages (`benchmarks/bench_stages.py`)",
        "",
        f"Machine: {machine_line()}. Each stage's `process` on a warm worker (models loaded), no Ray; best of two "
        "timed calls after a warm-up (translation and inversion: one). Translators have random weights at the "
        "official sizes; the inversion uses the bundled generator, LPIPS-alex (random backbone), batch 4.",
        "",
        *table,
    ])
    write_section("stages", body)
    print(body)


if __name__ == "__main__":
    main()

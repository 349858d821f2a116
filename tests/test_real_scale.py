"""Real scale: a random-weight 1024 config-f checkpoint in rosinality's format through `latentray invert` in W+,
S and F/W+ (2 steps, 1 image, CPU): the shapes of the real model, finite metrics, the actor's peak memory; and the
quality path at full size: F/W+'s stored metrics are those of its stored latents rendered again, and its two steps
lowered the MSE below the start's."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_parts, tensor
from models.stylegan2 import Generator
from pipelines.cli import main


@pytest.mark.slow
def test_a_1024_config_f_checkpoint_inverts_in_every_space(tmp_path):
    torch.manual_seed(0)
    G = Generator(1024)
    torch.save({"g_ema": G.state_dict(), "latent_avg": torch.zeros(512)}, tmp_path / "ffhq-random.pt")
    del G
    (tmp_path / "in").mkdir()
    photo = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "in" / "face.png")
    out = tmp_path / "out"
    assert main(["invert", "--input", str(tmp_path / "in"), "--output", str(out), "--generator",
                 str(tmp_path / "ffhq-random.pt"), "--spaces", "wplus,s,fwplus", "--steps", "2", "--align", "none",
                 "--lpips-net", "alex", "--lpips-backbone", "random", "--set", "pnorm_samples=2000",
                 "--set", "w_stats_samples=2000"]) == 0
    table = read_parts(out)
    assert table.column("status").to_pylist() == ["ok"]
    assert tensor(table, "wplus").shape == (1, 18, 512) and tensor(table, "styles").shape == (1, 9088)
    assert tensor(table, "fwplus_base_code").shape == (1, 512, 16, 16)
    for space in ("wplus", "s", "fwplus"):
        for metric in ("mse", "psnr", "lpips"):
            assert np.isfinite(table.column(f"{space}_{metric}").to_numpy()).all(), (space, metric)
    meta = json.loads(table.schema.metadata[b"latentray"])
    assert sum(layer["width"] for layer in meta["style_layers"]) == 9088
    # F/W+ (no noise optimisation): re-render the stored base code + W+ with the checkpoint, compare with the photo
    from models.checkpoints import load_generator
    from ops import metrics
    from ops.invert import w_statistics
    from ops.latents import render

    G = load_generator(str(tmp_path / "ffhq-random.pt"))
    target = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 127.5 - 1
    again = render(G, {c: tensor(table, c) for c in ("fwplus_wplus", "fwplus_base_code")}, "fwplus")
    stored_mse = table.column("fwplus_mse").to_numpy()[0]
    assert metrics.mse(again, target).item() == pytest.approx(stored_mse, rel=1e-3)
    with torch.no_grad():  # F/W+ starts at w_avg (the checkpoint's latent_avg) and G.base_code of it
        start = G.synthesis(G.to_wplus(w_statistics(G, 2000, 0)[0].reshape(1, -1)))
    assert stored_mse < metrics.mse(start, target).item()  # the steps lowered it
    stats = json.loads((out / "stats.json").read_text())
    assert stats["actor_peak_rss_mb"] > 500  # the 1024 model and its activations were really in the actor
    print(f"actor peak RSS {stats['actor_peak_rss_mb']:.0f} MiB, {stats['seconds']:.0f} s")

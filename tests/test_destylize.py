"""Destylization on the seeded companions of the bundled generator: per-image independence inside a batch, the
colour-row resets, the loss actually optimised, and the identity term's on/off recording."""

import pytest
import torch

from models.companions import finetuned_copy, identity_net, zplus_encoder
from models.default_generator import load_default_generator
from ops.destylize import DestylizeConfig, compare_size, destylize, map_zplus

FAST = dict(lpips_net="alex", lpips_backbone="random")


@pytest.fixture(scope="module")
def models():
    g = load_default_generator()
    return g, finetuned_copy(g), zplus_encoder(g), identity_net()


def portraits(n, seed=0):
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(x, size=256, mode="bilinear").tanh()


def test_a_portrait_destylizes_the_same_alone_or_in_a_batch(models):
    g, g_ft, encoder, identity = models
    s = portraits(3)
    keys = ["a.png", "b.png", "c.png"]
    cfg = DestylizeConfig(steps=25, **FAST)
    batch = destylize(g, g_ft, encoder, s, keys, cfg, identity=identity)
    alone = destylize(g, g_ft, encoder, s[1:2], keys[1:2], cfg, identity=identity)
    assert torch.equal(batch["z_hat"][1], alone["z_hat"][0])  # bit for bit
    assert torch.equal(batch["face"][1], alone["face"][0])
    assert batch["id_weight"] == 0.1 and batch["id_sim"].shape == (3,)


def test_codes_losses_and_colour_rows(models):
    g, g_ft, encoder, _ = models
    s = portraits(2, seed=1)
    cfg = DestylizeConfig(steps=30, **FAST)
    out = destylize(g, g_ft, encoder, s, ["x", "y"], cfg)
    assert out["id_weight"] == 0.0 and "id_sim" not in out  # no identity model: the term is off and says so
    assert torch.equal(out["z_hat"][:, 8:], out["z_e"][:, 8:]) and torch.equal(out["z_i"][:, 8:], out["z_e"][:, 8:])
    assert not torch.equal(out["z_hat"][:, :8], out["z_e"][:, :8])
    # the optimised code explains the portraits better than the encoder's start (compared like the loss does)
    from models.perceptual import box_downsample
    from ops.invert import shared_perceptual

    size, target = compare_size(g_ft, s)
    lpips = shared_perceptual("alex", "random")
    with torch.no_grad():
        start = lpips(box_downsample(g_ft.synthesis(map_zplus(g_ft, out["z_e"])), size), target)
    assert (out["lpips"] < start).all()
    # the faces are g renders of the codes at truncation 0.7 toward 0 (with the run's noise maps, not stored)
    assert out["face"].shape == (2, 3, g.size, g.size) and out["intermediate"].shape == out["face"].shape
    assert out["z_i"].shape == (2, g.n_latent, g.style_dim)

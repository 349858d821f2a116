"""Inversion engine: per-space behaviour, per-image independence, schedules and quality on known ground truth.

All runs use the bundled small generator and LPIPS with an explicitly opted-in random AlexNet backbone
(no ImageNet weights offline): results are labelled lpips_backbone="random"."""

import math

import numpy as np
import pytest
import torch

from ops import metrics
from ops.geometry import similarity_warp
from ops.invert import SPACE_DEFAULTS, InvertConfig, invert, learning_rate

FAST = dict(lpips_net="alex", lpips_backbone="random")
QUALITY = dict(FAST, batch_invariant=False)  # quality checks take the faster batched path (test_device_path)


def ground_truth(G, n, seed=0):
    """Images from random W+ (each row an independent mapped z): they lie in the generator's range."""
    z = torch.randn(n * G.n_latent, G.style_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        wplus = G.mapping(z).reshape(n, G.n_latent, G.style_dim)
        return wplus, G.synthesis(wplus)


def test_config_takes_each_space_defaults():
    wp = InvertConfig(space="wplus").resolved()
    assert (wp.steps, wp.lr, wp.lr_schedule, wp.mse_weight, wp.optimize_noise) == (1000, 0.1, "ramp", 0.0, True)
    fw = InvertConfig(space="fwplus").resolved()
    assert (fw.steps, fw.lr, fw.lr_schedule, fw.mse_weight, fw.lpips_weight, fw.f_weight, fw.pnorm_weight) == \
        (1200, 0.01, "constant", 1.0, 10.0, 10.0, 0.01)
    assert not fw.optimize_noise and fw.base_level == 16
    assert InvertConfig(space="wplus", steps=7, lr=0.5).resolved().steps == 7
    assert set(SPACE_DEFAULTS) == {"w", "wplus", "s", "fwplus"}
    with pytest.raises(ValueError, match="space must be one of"):
        InvertConfig(space="z").resolved()


def test_projector_learning_rate_schedule():
    cfg = InvertConfig(space="wplus", steps=1000).resolved()
    assert learning_rate(cfg, 0) == 0.0  # t = 0: ramp-up starts at zero
    assert learning_rate(cfg, 25) == pytest.approx(0.1 * 0.5)  # halfway up the 5 % linear ramp
    assert learning_rate(cfg, 500) == pytest.approx(0.1)  # plateau
    assert learning_rate(cfg, 875) == pytest.approx(0.1 * (0.5 - 0.5 * math.cos(math.pi * 0.5)))  # cosine, r = 0.5
    assert learning_rate(InvertConfig(space="fwplus").resolved(), 600) == 0.01


@pytest.mark.parametrize("space", ["w", "wplus", "s", "fwplus"])
def test_result_shapes_and_per_image_independence(G, space):
    """50 steps: an image inverted inside a batch of 3 equals the same image (same key) inverted alone.
    On CPU this holds bit for bit (convolutions run image by image, style affines are batch-invariant)."""
    _, images = ground_truth(G, 3, seed=1)
    cfg = InvertConfig(space=space, steps=50, base_level=8, **FAST)
    keys = ["a.png", "b.png", "c.png"]
    batch = invert(G, images, keys, cfg)
    alone = invert(G, images[1:2], keys[1:2], cfg)
    latent = {"s": "styles"}.get(space, "wplus")
    assert torch.equal(batch[latent][1:2], alone[latent])  # bit for bit, as claimed
    if space == "fwplus":
        assert batch["base_code"].shape == (3, G.channels[8], 8, 8)
        assert torch.equal(batch["base_code"][1:2], alone["base_code"])
    if space == "s":
        assert batch["styles"].shape == (3, G.n_styles)
    else:
        assert batch["wplus"].shape == (3, G.n_latent, G.style_dim)
    if space == "w":  # one w per image, broadcast to every row
        assert torch.equal(batch["wplus"], batch["wplus"][:, :1].expand_as(batch["wplus"]))
    assert batch["recon"].shape == images.shape
    for name in ("mse", "psnr", "lpips", "steps", "seconds"):
        assert batch[name].shape == (3,)
    np.testing.assert_allclose(batch["psnr"], 10 * np.log10(4 / batch["mse"].numpy()), rtol=1e-5)
    assert batch["lpips_backbone"] == "random" and batch["lpips_net"] == "alex"


def test_randomness_comes_from_the_key_not_the_batch(G):
    """Different keys draw different noise maps; the same key the same, whatever the neighbours."""
    _, images = ground_truth(G, 2, seed=2)
    twin = images[:1].expand(2, -1, -1, -1)
    cfg = InvertConfig(space="wplus", steps=5, **FAST)
    same = invert(G, twin, ["x", "x"], cfg)
    other = invert(G, twin, ["x", "y"], cfg)
    assert torch.equal(same["noises"][0][0], same["noises"][0][1])
    assert not torch.equal(other["noises"][0][0], other["noises"][0][1])
    assert torch.equal(other["noises"][0][0], same["noises"][0][0])


def test_inverter_refuses_bad_inputs(G):
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 64, 64\]"):
        invert(G, torch.zeros(1, 3, 32, 32), ["k"], InvertConfig(steps=1, **FAST))
    with pytest.raises(ValueError, match="1 keys for 2 images"):
        invert(G, torch.zeros(2, 3, 64, 64), ["k"], InvertConfig(steps=1, **FAST))
    with pytest.raises(ValueError, match="base-code level"):
        invert(G, torch.zeros(1, 3, 64, 64), ["k"], InvertConfig(space="fwplus", base_level=4, steps=1, **FAST))


@pytest.mark.slow
@pytest.mark.parametrize("space", ["wplus", "fwplus"])
def test_ground_truth_is_recovered(G, space):
    """Images generated from random W+ are recovered to PSNR >= 30 dB, well above the w_avg starting image."""
    _, images = ground_truth(G, 4, seed=3)
    with torch.no_grad():
        start = G.synthesis(G.w_avg[None].expand(4, -1))
    encoder = None
    if space == "fwplus":  # BDInvert's recipe starts F from its base-code encoder
        from models.default_generator import DEFAULT_GENERATOR_PATH
        from models.encoders import load_basecode_encoder

        encoder = load_basecode_encoder(str(DEFAULT_GENERATOR_PATH.with_name("default_basecode_encoder_l16.pt")), G)
    result = invert(G, images, [f"gt/{i}" for i in range(4)], InvertConfig(space=space, steps=300, **QUALITY),
                    encoder=encoder)
    assert result["psnr"].min() >= 30
    assert (result["psnr"] - metrics.psnr(start, images)).min() >= 5


def test_similarity_warp_moves_content_by_the_requested_pixels():
    x = torch.zeros(1, 1, 64, 64)
    x[0, 0, 20, 30] = 1
    shifted = similarity_warp(x, shift=(0.125, 0.0))  # 8 px right
    assert shifted[0, 0].argmax().item() == 20 * 64 + 38
    turned = similarity_warp(x, degrees=90)  # about the centre (31.5, 31.5): (row 20, col 30) -> (row 33, col 20)
    assert turned[0, 0].argmax().item() == 33 * 64 + 20


def test_identity_similarity_is_reported_when_an_identity_model_is_given(G):
    _, images = ground_truth(G, 2, seed=6)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.Flatten())

    def embed(x):
        e = net(x)
        return e / e.norm(dim=1, keepdim=True)

    out = invert(G, images, ["a", "b"], InvertConfig(space="wplus", steps=3, **FAST), identity=embed)
    with torch.no_grad():
        a, b = net(out["recon"]), net(images)
        expected = torch.nn.functional.cosine_similarity(a, b, dim=1)
        assert torch.allclose(out["id_sim"], expected, atol=1e-5)
        assert torch.allclose(metrics.identity_similarity(embed, images, images), torch.ones(2), atol=1e-5)
    assert "id_sim" not in invert(G, images, ["a", "b"], InvertConfig(space="wplus", steps=1, **FAST))


@pytest.mark.slow
def test_base_code_follows_shifted_and_rotated_images_that_w_plus_cannot(G):
    """Out-of-range targets (shifted 1/8 of the width, rotated 10 degrees, reflection fill): W+ (Image2StyleGAN, noise
    fixed) cannot move the generator's anchored layout; the F/W+ space can. F is left free here (f_weight 0, lr 0.05),
    which isolates the space's capacity from the quality of the base-code encoder's start."""
    _, images = ground_truth(G, 4, seed=0)
    targets = similarity_warp(images, degrees=10, shift=(0.125, 0.0), padding="reflection")
    keys = [f"shifted/{i}" for i in range(4)]
    wplus = invert(G, targets, keys, InvertConfig(space="wplus", steps=300, optimize_noise=False, **QUALITY))
    fwplus = invert(G, targets, keys, InvertConfig(space="fwplus", steps=300, f_weight=0.0, lr=0.05, **QUALITY))
    assert (fwplus["psnr"] - wplus["psnr"]).min() >= 3


@pytest.mark.slow
def test_bdinvert_beats_w_plus_at_equal_budgets_on_images_no_choice_was_made_on(G):
    """BDInvert's claim at equal step budgets (300 each) and equal losses (MSE 1 + LPIPS 10 + P_N+ 0.01, lr 0.01
    constant, for both spaces), on out-of-range images (seeds 300-303) that neither the anchor sweep (tuning set) nor
    its report (held-out set) of benchmarks/bench_bdinvert.py used. With the anchor recommended for low-contrast
    generators (chosen there on the tuning set), F/W+ beats W+ with the same losses and W+ with its own projector
    recipe; the shipped default anchor (10) pins F near the encoder's start and does clearly worse."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_bdinvert import BASE, BDINVERT_LOSSES, ENCODER, TEST, out_of_range
    from models.encoders import load_basecode_encoder
    from ops.invert import LOW_CONTRAST_F_WEIGHT

    encoder = load_basecode_encoder(str(ENCODER), G)
    targets, keys = out_of_range(G, TEST), [f"test/{s}" for s in TEST]
    same = invert(G, targets, keys, InvertConfig(space="wplus", steps=300, **BDINVERT_LOSSES, **BASE))["psnr"]
    projector = invert(G, targets, keys, InvertConfig(space="wplus", steps=300, optimize_noise=False,
                                                      **BASE))["psnr"]
    recommended, default = (invert(G, targets, keys, InvertConfig(space="fwplus", steps=300, f_weight=f, **BASE),
                                   encoder=encoder)["psnr"] for f in (LOW_CONTRAST_F_WEIGHT, 10.0))
    assert (recommended - same).mean() >= 3 and (recommended - same).min() >= 1
    assert (recommended - projector).mean() >= 2
    assert (recommended - default).mean() >= 2
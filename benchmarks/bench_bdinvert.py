"""BDInvert's claim, measured honestly: F/W+ against W+ on out-of-range images (samples of the bundled generator
shifted by 1/8 of the width and rotated 10 degrees) at EQUAL step budgets and EQUAL losses (BDInvert's: MSE 1 +
LPIPS 10 + P_N+ 0.01, Adam lr 0.01 constant, constant noise; F/W+ adds its base-code anchor and starts F from the
shipped base-code encoder), plus W+ with its own projector recipe (without and with its noise optimisation) as
further baselines at the same step count, F/W+ without the encoder start, and the same comparison on a copy of the
generator whose coarse layout is not anchored in its constant noise (conditions that favour F/W+ on the bundled one).

The anchor weight is chosen on a TUNING set (seeds 100-103) and reported on a HELD-OUT set (seeds 200-203); the
test (tests/test_invert.py) checks the recommendation on a third set (seeds 300-303) used by neither."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import machine_line, write_section  # noqa: E402
from models.default_generator import DEFAULT_GENERATOR_PATH, coarse_convs, load_default_generator  # noqa: E402
from models.encoders import load_basecode_encoder  # noqa: E402
from ops.geometry import similarity_warp  # noqa: E402
from ops.invert import SPACE_DEFAULTS, InvertConfig, invert  # noqa: E402

ENCODER = DEFAULT_GENERATOR_PATH.with_name("default_basecode_encoder_l16.pt")
TUNING, HELD_OUT, TEST = (100, 101, 102, 103), (200, 201, 202, 203), (300, 301, 302, 303)
ANCHORS = (10.0, 1.0, 0.1, 0.01, 0.001, 0.0)
BASE = dict(lpips_net="alex", lpips_backbone="random", batch_invariant=False)
# BDInvert's losses and optimiser, for both spaces (the F/W+ recipe of SPACE_DEFAULTS without its anchor)
BDINVERT_LOSSES = {k: SPACE_DEFAULTS["fwplus"][k] for k in ("lr", "lr_schedule", "mse_weight", "lpips_weight",
                                                           "pnorm_weight", "optimize_noise", "latent_noise")}


def out_of_range(G, seeds) -> torch.Tensor:
    """One image per seed from random W+ rows, shifted 1/8 of the width and rotated 10 degrees (reflection)."""
    images = []
    for seed in seeds:
        z = torch.randn(G.n_latent, G.style_dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            images.append(G.synthesis(G.mapping(z)[None]))
    return similarity_warp(torch.cat(images), degrees=10, shift=(0.125, 0.0), padding="reflection")


def unanchored(G):
    """A copy of G whose coarse StyledConvs add no noise: its layout follows W+ alone (models/default_generator.py
    anchors the bundled one's in the constant noise, which W+ cannot move)."""
    import copy

    H = copy.deepcopy(G)
    with torch.no_grad():
        for conv in coarse_convs(H):
            conv.noise.weight.zero_()
    return H


def compare(G, encoder, seeds, steps: int, anchors, baselines: bool = True) -> dict:
    """Mean PSNR at `steps` steps of W+ (same losses), W+ (projector recipe, without and with noise optimisation;
    with `baselines`), F/W+ at each anchor from the encoder (when given) and F/W+ at each anchor from G.base_code(w_avg)
    (when `encoder` is None or `baselines`)."""
    targets, keys = out_of_range(G, seeds), [f"oor/{s}" for s in seeds]
    runs = {"wplus, same losses": (InvertConfig(space="wplus", steps=steps, **BDINVERT_LOSSES, **BASE), None)}
    if baselines:
        runs["wplus, projector recipe"] = (InvertConfig(space="wplus", steps=steps, optimize_noise=False, **BASE), None)
        runs["wplus, projector recipe + noise"] = (InvertConfig(space="wplus", steps=steps, **BASE), None)
    for f in anchors:
        if encoder is not None:
            runs[f"fwplus, anchor {f:g}"] = (InvertConfig(space="fwplus", steps=steps, f_weight=f, **BASE), encoder)
        if encoder is None or baselines:
            runs[f"fwplus, anchor {f:g}, no encoder"] = (InvertConfig(space="fwplus", steps=steps, f_weight=f,
                                                                      **BASE), None)
    return {name: invert(G, targets, keys, cfg, encoder=enc)["psnr"].mean().item()
            for name, (cfg, enc) in runs.items()}


def main() -> None:
    torch.set_num_threads(2)
    G = load_default_generator()
    encoder = load_basecode_encoder(str(ENCODER), G)
    tuning = compare(G, encoder, TUNING, 300, ANCHORS, baselines=False)
    # The rule, fixed before looking at the held-out set: the strongest anchor within 0.5 dB of the best one on the
    # tuning set (PSNR alone would always drop the anchor, which is there to keep F plausible for editing).
    top = max(tuning[f"fwplus, anchor {f:g}"] for f in ANCHORS)
    best = max(f for f in ANCHORS if tuning[f"fwplus, anchor {f:g}"] >= top - 0.5)
    print("tuning", tuning, "best anchor", best, flush=True)
    held = {steps: compare(G, encoder, HELD_OUT, steps, (10.0, best)) for steps in (300, 1200)}
    free = unanchored(G)
    plain = {steps: compare(free, None, HELD_OUT, steps, (best,)) for steps in (300, 1200)}

    def table(results):
        out = ["| method (held-out set, mean PSNR dB) | 300 steps | 1200 steps | vs W+ same losses (300 / 1200) |",
               "|---|---:|---:|---:|"]
        for name in results[300]:
            gaps = " / ".join(f"{results[s][name] - results[s]['wplus, same losses']:+.2f}" for s in (300, 1200))
            out.append(f"| {name} | {results[300][name]:.2f} | {results[1200][name]:.2f} | {gaps} |")
        return out

    rows = table(held)
    sweep = ["| anchor weight (tuning set, 300 steps) | F/W+ PSNR | vs W+ same losses |", "|---:|---:|---:|"]
    for f in ANCHORS:
        value = tuning[f"fwplus, anchor {f:g}"]
        sweep.append(f"| {f:g} | {value:.2f} | {value - tuning['wplus, same losses']:+.2f} |")
    body = "\n".join([
        "## BDInvert F/W+ vs W+ at equal budgets (`benchmarks/bench_bdinvert.py`)",
        "",
        f"Machine: {machine_line()}. Bundled 64-px generator; 4 out-of-range images per set (random W+ samples shifted "
        "1/8 width, rotated 10°, reflection fill); LPIPS-alex (random backbone); batched path. Every method gets the "
        "same steps; 'same losses' = BDInvert's MSE 1 + LPIPS 10 + P_N+ 0.01 at lr 0.01 constant for both spaces; "
        "F/W+ starts from the shipped base-code encoder and adds its anchor f·mean((F − F0)²).",
        "",
        f"Anchor chosen on the tuning set (seeds {TUNING[0]}-{TUNING[-1]}) by a rule fixed beforehand, the strongest "
        f"anchor within 0.5 dB of the best one: **{best:g}** (PSNR alone always prefers no anchor; the anchor keeps F "
        "near the encoder's plausible start, which matters for editing and which PSNR does not measure).",
        "",
        *sweep,
        "",
        f"Reported on the held-out set (seeds {HELD_OUT[0]}-{HELD_OUT[-1]}), with the shipped default anchor (10) and "
        "the recommended one:",
        "",
        *rows,
        "",
        "Conditions that favour F/W+ in the table above: the bundled generator anchors its coarse layout in its "
        "constant noise, which W+ cannot move but F can; the encoder start was trained on this generator's own "
        "samples; and the 'same losses' W+ baseline uses BDInvert's optimiser (lr 0.01), not its own recipe. The "
        "rows 'projector recipe + noise' (rosinality's recipe, noise maps optimised) and 'no encoder' (F from "
        "G.base_code(w_avg)) remove two of them; the table below removes the third: the same generator with the "
        "coarse noise strengths set to 0 (held-out set, same seeds, the images re-rendered by that generator; no "
        "encoder exists for it).",
        "",
        *table(plain),
    ])
    write_section("bdinvert", body)
    print(body)


if __name__ == "__main__":
    main()

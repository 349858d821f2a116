"""Small seeded companion models that fit the bundled generator (style dim 128, 10 W+ rows, 64 px), for the demo,
the tests and the benchmarks of the style stages: a "fine-tuned" g', a Z+ pSp encoder, an ArcFace identity net, a
DualStyleGAN and a CycleGAN generator. They are untrained (deterministic random weights, made in about a second), so they prove the
plumbing and the maths, not image quality; each is written in its official checkpoint format so the stages load
them exactly as they load real ones. `python -m models.companions DIR` writes them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from models.dualstylegan import DualStyleGAN
from models.encoders import StyleEncoder
from models.identity import ArcFace

ENCODER_WIDTHS = [16, 16, 24, 32]  # SE blocks need >= 16 channels


def finetuned_copy(G, seed: int = 1, strength: float = 0.05):
    """g': the synthesis weights nudged by seeded relative noise (a stand-in for a few hundred fine-tuning steps,
    which keep g and g' aligned); the mapping network is shared, as in DualStyleGAN's recipe."""
    g_ft = copy.deepcopy(G)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in g_ft.named_parameters():
            if not name.startswith("style."):
                p.mul_(1 + strength * torch.randn(p.shape, generator=gen))
    return g_ft


def zplus_encoder(G, seed: int = 2) -> StyleEncoder:
    """A pSp GradualStyleEncoder emitting one Z+ row per W+ row of G."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = StyleEncoder(ENCODER_WIDTHS, G.style_dim, G.n_latent)
        with torch.no_grad():  # random BN statistics so that the 24 units do not wash every input out
            for m in encoder.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.uniform_(0.5, 2.0)
                    m.running_mean.normal_(0, 0.1)
    return encoder.eval().requires_grad_(False)


def identity_net(seed: int = 3) -> ArcFace:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ArcFace(ENCODER_WIDTHS, 32)
    return net.eval().requires_grad_(False)


def dualstylegan(G, seed: int = 4) -> DualStyleGAN:
    """DualStyleGAN around a copy of G whose extrinsic path visibly acts (ModRes convs not near zero)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DualStyleGAN(copy.deepcopy(G))
        with torch.no_grad():
            for j, block in enumerate(model.res):
                if j < 7:  # the official init scales these by 0.01 (a no-op residual); make them matter
                    block.conv[0].weight.mul_(0.3)
                    block.conv2[0].weight.mul_(0.3)
                else:  # colour FCs: identity plus noise, as the official init
                    d = block.weight.shape[0]
                    block.weight.copy_(torch.eye(d) * d**0.5 + 0.3 * torch.randn(d, d))
    return model.eval().requires_grad_(False)


def cyclegan(seed: int = 6):
    """A junyanz ResNet generator (ngf 8, 2 blocks) with the official N(0, 0.02) init and seeded biases."""
    from models.translation import ResnetGenerator

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ResnetGenerator(ngf=8, n_blocks=2)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.normal_(0, 0.02 if name.endswith("weight") else 0.05)
    return net.eval()


def write_all(folder: str, G=None, n_styles: int = 3) -> dict[str, str]:
    """Write g', the Z+ encoder, the identity net, a DualStyleGAN and `n_styles` exstyle codes in official formats;
    returns their paths by role."""
    from models.checkpoints import save_generator
    from models.default_generator import load_default_generator

    G = G or load_default_generator()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out / file) for name, file in (
        ("finetuned", "finetuned_generator.pt"), ("encoder", "zplus_encoder.pt"), ("identity", "identity.pth"),
        ("dualstylegan", "dualstylegan.pt"), ("exstyles", "exstyle_code.npy"), ("cyclegan", "latest_net_G_A.pth"))}
    save_generator(finetuned_copy(G), paths["finetuned"])
    encoder = zplus_encoder(G)
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                "opts": {"encoder_type": "GradualStyleEncoder", "start_from_latent_avg": False}}, paths["encoder"])
    torch.save(identity_net().state_dict(), paths["identity"])
    torch.save({"g_ema": dualstylegan(G).state_dict()}, paths["dualstylegan"])
    torch.save(cyclegan().state_dict(), paths["cyclegan"])
    gen = torch.Generator().manual_seed(5)
    codes = {f"style{i}.png": torch.randn(1, G.n_latent, G.style_dim, generator=gen).numpy() for i in range(n_styles)}
    np.save(paths["exstyles"], np.array(codes, dtype=object), allow_pickle=True)
    return paths


if __name__ == "__main__":
    import sys

    for role, path in write_all(sys.argv[1] if len(sys.argv) > 1 else "out/companions").items():
        print(f"{role}: {path}")

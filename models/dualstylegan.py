"""DualStyleGAN (Yang et al. 2022) on our StyleGAN2 generator, in the official `generator.pt` layout
(conventions and the known pitfalls: shared/reference/dualstylegan/README.md).

Intrinsic path: the StyleGAN2 `generator.*`. Extrinsic path, driven by an extrinsic W+ code A (an exstyle Z+ code
mapped row by row by the intrinsic mapping): the structure transform `style` = T_s (PixelNorm + FCs, lr 0.01)
feeds ModRes blocks `res[0..6]` that add a weighted AdaIN residual after the convs of 4-32 px; colour transforms
`res[7..]` (plain equalised FCs of A) are blended with the intrinsic W rows of the finer layers. Row j of the
weight vector scales ModRes j (structure) or blends colour layer j.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoints import (CheckpointError, build_generator, infer_rosinality_architecture, load_state,
                                read_bytes)
from models.stylegan2 import EqualLinear, FusedLeakyReLU, Generator, PixelNorm

STRUCTURE_ROWS = 7  # W+ rows 0..6 drive ModRes blocks (4x4 conv and the 8-32 px convs)


class EqualConv2d(nn.Module):
    """3x3 conv, padding 1, no bias, weight scaled by 1/sqrt(fan_in) at run time (rosinality ConvLayer's conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3))
        self.scale = 1 / math.sqrt(channels * 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, padding=1)


class AdaIN(nn.Module):
    """Affine-free instance norm, then gamma * x + beta from a plain linear layer of the style (no lr scaling)."""

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.style = nn.Linear(style_dim, 2 * channels)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style(s)[:, :, None, None].chunk(2, dim=1)
        return gamma * F.instance_norm(x, eps=1e-5) + beta


class ModRes(nn.Module):
    """x + w * conv2(AdaIN2(conv(AdaIN1(x, s)), s)); w == 0 returns x itself (exactly the intrinsic generator)."""

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.conv = nn.Sequential(EqualConv2d(channels), FusedLeakyReLU(channels))
        self.conv2 = nn.Sequential(EqualConv2d(channels), FusedLeakyReLU(channels))
        self.norm, self.norm2 = AdaIN(channels, style_dim), AdaIN(channels, style_dim)

    def forward(self, x: torch.Tensor, s: torch.Tensor, w: float) -> torch.Tensor:
        if w == 0:
            return x
        return self.conv2(self.norm2(self.conv(self.norm(x, s)), s)) * w + x


class DualStyleGAN(nn.Module):
    def __init__(self, generator: Generator, n_structure_fc: int = 2):
        super().__init__()
        d = generator.style_dim
        self.generator = generator
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(d, d, lr_mul=0.01, activate=True)
                                                  for _ in range(n_structure_fc)])
        # a ModRes block acts on the output of the conv that reads row j
        widths = {layer.w_index: generator.channels[layer.resolution] for layer in generator.style_layers
                  if not layer.is_torgb}
        self.res = nn.ModuleList(
            ModRes(widths[j], d) if j < STRUCTURE_ROWS else EqualLinear(d, d) for j in range(generator.n_latent))
        self.n_latent, self.size = generator.n_latent, generator.size

    def forward(self, styles, exstyles, return_latents=False, truncation=1.0, truncation_latent=None,
                input_is_latent=False, noise=None, randomize_noise=True, z_plus_latent=False, use_res=True,
                fuse_index=18, interp_weights=None, inject_index=None, generator: torch.Generator | None = None):
        """The official call: `styles` a one-element list holding z [B, D], Z+ [B, L, D] (z_plus_latent) or W+
        (input_is_latent); `exstyles` the extrinsic W+ [B, L, D] (or [B, D]). Returns (image, latent or None).
        randomize_noise=True (the official default) draws fresh noise from `generator`, or from torch's global RNG
        when none is given, as the official module does; the stages always pass randomize_noise=False."""
        G = self.generator
        code = styles[0]
        if len(styles) != 1 or inject_index is not None:
            raise ValueError("style mixing of two intrinsic codes is not supported; pass one code")
        if not input_is_latent:
            code = G.mapping(code.reshape(-1, code.shape[-1])).reshape(code.shape)
        if truncation < 1:
            anchor = 0 if truncation_latent is None else truncation_latent
            code = anchor + truncation * (code - anchor)
        latent = G.to_wplus(code)
        weights = list(interp_weights) if interp_weights is not None else [1.0] * self.n_latent
        if use_res:
            ext = exstyles if exstyles.ndim == 3 else exstyles[:, None].expand(-1, self.n_latent, -1)
            structure = self.style(ext.reshape(-1, ext.shape[-1])).reshape(ext.shape)
        if noise is not None:
            noises = noise
        elif randomize_noise:
            noises = G.make_noise(latent.shape[0], "random", generator or torch.default_generator)
        else:
            noises = G.make_noise(latent.shape[0], "const")

        def extrinsic(j: int) -> bool:  # index 0 needs fuse_index > 0, the rest fuse_index >= j
            return use_res and (fuse_index > 0 if j == 0 else fuse_index >= j)

        def row(j: int) -> torch.Tensor:  # colour layers: w_j T_c(A_j) + (1 - w_j) latent_j
            if j >= STRUCTURE_ROWS and extrinsic(j):
                return weights[j] * self.res[j](ext[:, j]) + (1 - weights[j]) * latent[:, j]
            return latent[:, j]

        def conv(module, x, j, n):
            x = module(x, module.conv.modulation(row(j)), n)
            return self.res[j](x, structure[:, j], weights[j]) if j < STRUCTURE_ROWS and extrinsic(j) else x

        x = conv(G.conv1, G.input(latent.shape[0]), 0, noises[0])
        skip = G.to_rgb1(x, G.to_rgb1.conv.modulation(latent[:, 1]), None)
        for k, (up, second, rgb) in enumerate(zip(G.convs[::2], G.convs[1::2], G.to_rgbs)):
            x = conv(up, x, 2 * k + 1, noises[2 * k + 1])
            x = conv(second, x, 2 * k + 2, noises[2 * k + 2])
            skip = rgb(x, rgb.conv.modulation(row(2 * k + 3)), skip)
        return skip, (latent if return_latents else None)


def load_dualstylegan(path: str, device: str | torch.device = "cpu") -> DualStyleGAN:
    """An official DualStyleGAN `generator.pt` ({'g_ema': state dict}) -> eval-mode module (weights_only load)."""
    name = str(path)
    obj = load_state(name, what="a DualStyleGAN generator.pt")
    sd = obj.get("g_ema") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith("res.0.") for k in sd):
        found = sorted(sd or obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{name}: expected a DualStyleGAN generator.pt ({{'g_ema': ...}} with generator.*, "
                              f"style.*, res.* keys), found {found}")
    intrinsic = {k[len("generator."):]: v for k, v in sd.items() if k.startswith("generator.")}
    G = build_generator(infer_rosinality_architecture(intrinsic), intrinsic, None, name)
    n_fc = sum(1 for k in sd if k.startswith("style.") and k.endswith(".weight"))
    model = DualStyleGAN(G, n_fc)
    rest = {k: v for k, v in sd.items() if not k.startswith("generator.")}
    missing, unexpected = model.load_state_dict({**{f"generator.{k}": v for k, v in G.state_dict().items()},
                                                 **rest}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{name}: extrinsic path does not fit: missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}")
    return model.to(device).eval().requires_grad_(False)


class _NumpyOnly(pickle.Unpickler):
    """Only what a pickled dict of float arrays needs, under numpy 1 and numpy 2 module names."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} in an exstyle code file")
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy 1
            from numpy.core import multiarray
        return {"_reconstruct": multiarray._reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]


def load_exstyle_codes(path: str) -> dict[str, np.ndarray]:
    """`exstyle_code.npy` ({image name: float32 [1, L, D] Z+ code}, an .npy holding a pickled dict) without
    executing anything: the .npy header is parsed, the pickle goes through an allow-list of numpy globals."""
    stream = io.BytesIO(read_bytes(path))
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(stream)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not an .npy file ({exc})") from None
    if dtype != np.dtype(object):
        raise CheckpointError(f"{path}: expected a pickled dict of codes (dtype object), found dtype {dtype}")
    try:
        value = _NumpyOnly(stream).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise CheckpointError(f"{path}: refused: {exc}") from None
    codes = value.item() if isinstance(value, np.ndarray) and value.shape == () else value
    if not isinstance(codes, dict):
        raise CheckpointError(f"{path}: expected a dict of codes, found {type(codes).__name__}")
    return {str(k): np.asarray(v, dtype=np.float32) for k, v in codes.items()}

"""StyleGAN2 generator in plain PyTorch, numerically the same function as the official checkpoints.

Parameter and buffer names follow rosinality/stylegan2-pytorch (`style.*`, `input.input`, `conv1`, `to_rgb1`,
`convs.*`, `to_rgbs.*`, `noises.noise_*`), so its `g_ema` state dicts load with `strict=True`; NVIDIA
stylegan2-ada snapshots are renamed onto the same names by `models.checkpoints`.

The maths follows the conventions listed in `shared/reference/stylegan2/README.md` §2. Modulated convolutions run
"non-fused": activations are scaled by the style, convolved with the shared weight, then scaled by the
demodulation coefficients. That is the same function as rosinality's per-sample grouped convolution (same eps
placement), but one ordinary convolution for the whole batch, which is what batched inversion wants.

Latent spaces (B = batch, D = style_dim, L = n_latent, C = channels of a layer):
  z      [B, D]      input of the mapping network
  w      [B, D]      output of the mapping network
  W+     [B, L, D]   one w per style input (`synthesis`)
  S      dict name -> [B, C_in]  raw affine outputs of every modulated layer (`styles`, `synthesis_from_styles`)
  F/W+   base code [B, C_level, level, level] + W+ (`base_code`, `synthesis_from_base_code`, BDInvert)
Images are NCHW in the [-1, 1] scale (not clamped: the official networks have no tanh).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def default_channels(size: int, channel_multiplier: int = 2) -> dict[int, int]:
    """Per-resolution widths of the official configs: 512 up to 32 px, then halving (config-f at multiplier 2)."""
    return {4 * 2**i: min(512, 16384 * channel_multiplier // (4 * 2**i)) for i in range(int(math.log2(size)) - 1)}


def make_kernel(taps) -> torch.Tensor:
    """2-D FIR kernel (outer product of the 1-D taps), normalised to sum 1."""
    k = torch.as_tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None] if k.ndim == 1 else k
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Zero-insert by `up`, pad (before, after) on both axes, then convolve every channel with `kernel`.

    x [B, C, H, W] -> [B, C, H*up + pad0 + pad1 - kh + 1, ...]. A true convolution (kernel flipped), as upfirdn2d is.
    """
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)


class PixelNorm(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(torch.mean(z * z, dim=1, keepdim=True) + 1e-8)


# Batch invariance: on CPU, oneDNN picks a convolution's algorithm (and a GEMM's kernel, and so their rounding) by
# batch size, and inversion amplifies even 1e-7 differences over many Adam steps. Invariant mode computes every
# image on its own (per_sample) and every affine as a row-wise product, so an image's result never depends on its
# batch; batched mode makes one call per batch (what a GPU wants). None: invariant on CPU, batched elsewhere.
_BATCH_INVARIANT: contextvars.ContextVar = contextvars.ContextVar("latentray_batch_invariant", default=None)


@contextlib.contextmanager
def batch_invariance(enabled: bool | None):
    """Within the block: per-image computations when True, batched calls when False, the device's default (None)."""
    token = _BATCH_INVARIANT.set(enabled)
    try:
        yield
    finally:
        _BATCH_INVARIANT.reset(token)


def is_batch_invariant(device: torch.device) -> bool:
    enabled = _BATCH_INVARIANT.get()
    return device.type == "cpu" if enabled is None else enabled


# Memory format of the activations: NHWC (channels last) makes the convolutions of large generators faster
# (measured in BENCHMARKS.md); the format follows from the first activation (the constant input, or a base code).
_CHANNELS_LAST: contextvars.ContextVar = contextvars.ContextVar("latentray_channels_last", default=False)


@contextlib.contextmanager
def channels_last(enabled: bool):
    token = _CHANNELS_LAST.set(enabled)
    try:
        yield
    finally:
        _CHANNELS_LAST.reset(token)


def activation_format(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if _CHANNELS_LAST.get() else x


def rowwise_matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, I] @ weight[O, I]^T with a summation order that does not depend on B (a GEMM batched otherwise)."""
    if not is_batch_invariant(x.device):
        return x @ weight.t()
    return (x[:, None, :] * weight[None]).sum(dim=-1)


def per_sample(conv, x: torch.Tensor) -> torch.Tensor:
    """Apply `conv` image by image in invariant mode (see batch_invariance), else to the whole batch at once."""
    if x.shape[0] == 1 or not is_batch_invariant(x.device):
        return conv(x)
    return torch.cat([conv(t) for t in x.split(1)])


class EqualLinear(nn.Module):
    """Fully connected layer with equalised learning rate: weight stored as randn/lr_mul, scaled at run time.

    `activate=True` fuses bias + leaky ReLU(0.2) * sqrt(2), as the mapping network does. `batch_invariant=True`
    (style affines, which inversion differentiates through) uses `rowwise_matvec` (a GEMM in batched mode).
    """

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False,
                 batch_invariant: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate
        self.batch_invariant = batch_invariant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            out = rowwise_matvec(x, self.weight * self.scale) + self.bias * self.lr_mul
        elif not self.activate:
            return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        else:
            out = F.linear(x, self.weight * self.scale) + self.bias * self.lr_mul
        if not self.activate:
            return out
        return F.leaky_relu(out, LRELU_SLOPE) * LRELU_GAIN


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return activation_format(self.input.expand(batch, -1, -1, -1))


class Blur(nn.Module):
    """FIR low-pass applied after the transposed convolution of an up-sampling layer (kernel stored ×4, sums to 4)."""

    def __init__(self, taps, pad: tuple[int, int], gain: float):
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps) * gain)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR up-sampling of the RGB skip: zero insertion, pad (2, 1), 4x4 kernel ×4."""

    def __init__(self, taps, factor: int = 2):
        super().__init__()
        kernel = make_kernel(taps) * factor**2
        self.register_buffer("kernel", kernel)
        p = kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution. `modulation(w) -> s [B, C_in]` is the StyleSpace code of this layer.

    `forward(x [B, C_in, H, W], s [B, C_in]) -> [B, C_out, H', W']` with H' = H, or 2H when `upsample`.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0, batch_invariant=True)
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            p = len(blur_kernel) - 2 - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        weight = self.weight[0] * self.scale  # [O, I, k, k]
        x = x * s.to(x.dtype)[:, :, None, None]
        if self.upsample:
            # Transposed conv without kernel flip, then blur: the official order (README §2.6).
            out = per_sample(lambda t: F.conv_transpose2d(t, weight.transpose(0, 1).to(x.dtype), stride=2), x)
        else:
            out = per_sample(lambda t: F.conv2d(t, weight.to(x.dtype), padding=self.padding), x)
        if self.demodulate:
            # sum_{i,kh,kw} (scale*W*s)^2 = (s^2) @ (sum_k (scale*W)^2)^T, in at least float32 even under autocast.
            precise = torch.promote_types(s.dtype, torch.float32)
            with torch.autocast(device_type=s.device.type, enabled=False):
                energy = rowwise_matvec(s.to(precise) ** 2, (weight.to(precise) ** 2).sum(dim=(2, 3)))
                demod = torch.rsqrt(energy + 1e-8)
            out = out * demod.to(out.dtype)[:, :, None, None]
        if self.upsample:
            out = self.blur(out)
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return x if noise is None else x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    """bias + leaky ReLU(0.2) * sqrt(2), optionally clamped (NVIDIA `conv_clamp`) after the gain."""

    def __init__(self, channels: int, clamp: float | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(x + self.bias[None, :, None, None], LRELU_SLOPE) * LRELU_GAIN
        return out if self.clamp is None else out.clamp(-self.clamp, self.clamp)


class StyledConv(nn.Module):
    """Modulated 3x3 conv -> + noise_strength * noise -> + bias -> lrelu * sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, upsample: bool = False, blur_kernel=(1, 3, 3, 1),
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch, clamp=conv_clamp)

    def forward(self, x: torch.Tensor, s: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, s), noise))


class ToRGB(nn.Module):
    """Modulated 1x1 conv (no demodulation) + bias, added to the up-sampled RGB skip of the previous resolution."""

    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True, blur_kernel=(1, 3, 3, 1),
                 conv_clamp: float | None = None):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.clamp = conv_clamp

    def forward(self, x: torch.Tensor, s: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, s) + self.bias
        if self.clamp is not None:
            out = out.clamp(-self.clamp, self.clamp)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


@dataclass(frozen=True)
class StyleLayer:
    """One modulated layer of S: `name` (rosinality module), `width` (= its C_in), `offset` into the concatenated
    S vector, `w_index` (W+ row it reads), `resolution`, and whether it is a ToRGB."""

    name: str
    width: int
    offset: int
    w_index: int
    resolution: int
    is_torgb: bool


class Generator(nn.Module):
    """StyleGAN2 generator (config-e/f "skip" architecture).

    Args:
        size: output resolution, a power of two >= 8.
        style_dim: width D of z and w.
        n_mlp: number of fully connected layers in the mapping network.
        channel_multiplier: scales the default widths (2 = config-f) when `channels` is not given.
        channels: explicit {resolution: width} for 4, 8, ..., size.
        blur_kernel: 1-D FIR taps of the up-sampling filters.
        lr_mlp: learning-rate multiplier of the mapping network (0.01 in every official config).
        conv_clamp: NVIDIA's activation clamp (None for rosinality and TF-converted models).
    """

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 channels: dict[int, int] | None = None, blur_kernel=(1, 3, 3, 1), lr_mlp: float = 0.01,
                 conv_clamp: float | None = None):
        super().__init__()
        log_size = int(math.log2(size))
        if size < 8 or 2**log_size != size:
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        chans = {int(k): int(v) for k, v in (channels or default_channels(size, channel_multiplier)).items()}
        missing = [4 * 2**i for i in range(log_size - 1) if 4 * 2**i not in chans]
        if missing:
            raise ValueError(f"channels has no width for resolutions {missing}")
        self.size, self.style_dim, self.n_mlp = size, style_dim, n_mlp
        self.channels = {r: chans[r] for r in sorted(chans) if r <= size}
        self.blur_taps = [float(t) for t in blur_kernel]
        self.lr_mlp, self.conv_clamp = lr_mlp, conv_clamp
        self.n_latent = 2 * log_size - 2
        self.num_layers = 2 * log_size - 3  # StyledConvs = noise inputs
        self.resolutions = [4 * 2**i for i in range(log_size - 1)]

        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activate=True)
                                                  for _ in range(n_mlp)])
        c4 = self.channels[4]
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, style_dim, blur_kernel=blur_kernel, conv_clamp=conv_clamp)
        self.to_rgb1 = ToRGB(c4, style_dim, upsample=False, conv_clamp=conv_clamp)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        for res in self.resolutions[1:]:
            cin, cout = self.channels[res // 2], self.channels[res]
            self.convs.append(StyledConv(cin, cout, style_dim, upsample=True, blur_kernel=blur_kernel,
                                         conv_clamp=conv_clamp))
            self.convs.append(StyledConv(cout, cout, style_dim, blur_kernel=blur_kernel, conv_clamp=conv_clamp))
            self.to_rgbs.append(ToRGB(cout, style_dim, blur_kernel=blur_kernel, conv_clamp=conv_clamp))
        self.noises = nn.Module()
        for i in range(self.num_layers):
            r = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        # Mean w of the checkpoint (None when it has none); a non-persistent buffer so it follows .to(device).
        self.register_buffer("w_avg", None, persistent=False)
        self.style_layers = self._style_layer_table()
        self.n_styles = sum(layer.width for layer in self.style_layers)

    # ----- architecture description -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the generator's weights are."""
        return self.input.input.device

    def architecture(self) -> dict:
        """JSON-serialisable constructor arguments (our own checkpoint format stores this)."""
        return {"size": self.size, "style_dim": self.style_dim, "n_mlp": self.n_mlp,
                "channels": {str(r): c for r, c in self.channels.items()}, "blur_kernel": self.blur_taps,
                "lr_mlp": self.lr_mlp, "conv_clamp": self.conv_clamp}

    def _style_layer_table(self) -> list[StyleLayer]:
        rows, offset = [], 0
        for name, module, w_index, res, is_rgb in self._modulated_layers():
            width = module.conv.modulation.weight.shape[0]
            rows.append(StyleLayer(name, width, offset, w_index, res, is_rgb))
            offset += width
        return rows

    def _modulated_layers(self):
        """(name, module, W+ row, resolution, is_torgb) in generator order: conv1, to_rgb1, convs.0, convs.1, ..."""
        yield "conv1", self.conv1, 0, 4, False
        yield "to_rgb1", self.to_rgb1, 1, 4, True
        for k, res in enumerate(self.resolutions[1:]):
            yield f"convs.{2 * k}", self.convs[2 * k], 2 * k + 1, res, False
            yield f"convs.{2 * k + 1}", self.convs[2 * k + 1], 2 * k + 2, res, False
            yield f"to_rgbs.{k}", self.to_rgbs[k], 2 * k + 3, res, True

    # ----- Z and W ------------------------------------------------------------------------------------------------
    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D] -> w [B, D]."""
        return self.style(z)

    @staticmethod
    def truncate(w: torch.Tensor, w_avg: torch.Tensor, psi: float) -> torch.Tensor:
        """w_avg + psi * (w - w_avg) for w [B, D] or [B, L, D] and w_avg [D] or [1, D]."""
        return w_avg.reshape(-1) + psi * (w - w_avg.reshape(-1))

    @torch.no_grad()
    def mean_latent(self, n: int, seed: int = 0) -> torch.Tensor:
        """Mean of mapping(z) over n z ~ N(0, I) drawn from a torch.Generator seeded with `seed` -> [1, D]."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.style_dim, generator=gen).to(self.device)
        return self.mapping(z).mean(0, keepdim=True)

    def to_wplus(self, w: torch.Tensor) -> torch.Tensor:
        """Broadcast w [B, D] to W+ [B, n_latent, D]; W+ passes through."""
        return w if w.ndim == 3 else w[:, None, :].expand(-1, self.n_latent, -1)

    # ----- noise --------------------------------------------------------------------------------------------------
    def make_noise(self, batch: int, mode="const", generator: torch.Generator | None = None) -> list:
        """Per-layer noise in conv order: "const" (the checkpoint's buffers), "random" (drawn from `generator`,
        required; [B,1,r,r] per layer in order), "zero", or an explicit list of tensors (returned unchanged)."""
        if not isinstance(mode, str):
            if len(mode) != self.num_layers:
                raise ValueError(f"expected {self.num_layers} noise tensors, got {len(mode)}")
            return list(mode)
        buffers = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        if mode == "const":
            return buffers
        if mode == "zero":
            return [torch.zeros_like(b) for b in buffers]
        if mode == "random":
            if generator is None:
                raise ValueError('noise="random" needs an explicit torch.Generator (no hidden global RNG)')
            return [torch.randn(batch, 1, *b.shape[-2:], generator=generator, device=generator.device).to(b.device)
                    for b in buffers]
        raise ValueError(f"unknown noise mode {mode!r}: use 'const', 'random', 'zero' or a list of tensors")

    # ----- S space ------------------------------------------------------------------------------------------------
    def styles(self, wplus: torch.Tensor) -> dict[str, torch.Tensor]:
        """W+ [B, n_latent, D] (or w [B, D]) -> {layer name: s [B, C_in]} in generator order (raw affine outputs)."""
        wplus = self.to_wplus(wplus)
        return {name: m.conv.modulation(wplus[:, wi]) for name, m, wi, _, _ in self._modulated_layers()}

    def styles_to_vector(self, styles: dict[str, torch.Tensor]) -> torch.Tensor:
        """dict -> concatenated S vector [B, n_styles] in generator order."""
        return torch.cat([styles[layer.name] for layer in self.style_layers], dim=1)

    def vector_to_styles(self, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Concatenated S vector [B, n_styles] -> dict (views into `s`)."""
        return {layer.name: s[:, layer.offset:layer.offset + layer.width] for layer in self.style_layers}

    # ----- synthesis ----------------------------------------------------------------------------------------------
    def synthesis(self, wplus: torch.Tensor, noise="const", generator: torch.Generator | None = None) -> torch.Tensor:
        """W+ [B, n_latent, D] (or w [B, D]) -> image [B, 3, size, size]."""
        return self.synthesis_from_styles(self.styles(wplus), noise=noise, generator=generator)

    def synthesis_from_styles(self, styles: dict[str, torch.Tensor], noise="const",
                              generator: torch.Generator | None = None) -> torch.Tensor:
        """S (dict of [B, C_in], or the concatenated [B, n_styles]) -> image [B, 3, size, size]."""
        if isinstance(styles, torch.Tensor):
            styles = self.vector_to_styles(styles)
        batch = styles["conv1"].shape[0]
        noises = self.make_noise(batch, noise, generator)
        x = self.conv1(self.input(batch), styles["conv1"], noises[0])
        skip = self.to_rgb1(x, styles["to_rgb1"], None)
        return self._run_blocks(x, skip, styles, noises, start=8)

    def _run_blocks(self, x, skip, styles, noises, start: int, stop_after_up: int | None = None,
                    restart_feature: torch.Tensor | None = None):
        """Resolutions `start`..size. `stop_after_up=R` returns the up-conv output at R (the base code);
        `restart_feature` replaces the up-conv output at `start` and the RGB skip restarts from zero there."""
        for k, res in enumerate(self.resolutions[1:]):
            if res < start:
                continue
            up, conv, rgb = self.convs[2 * k], self.convs[2 * k + 1], self.to_rgbs[k]
            if restart_feature is not None and res == start:
                x, skip = activation_format(restart_feature), None
            else:
                x = up(x, styles[f"convs.{2 * k}"], noises[2 * k + 1])
                if res == stop_after_up:
                    return x
            x = conv(x, styles[f"convs.{2 * k + 1}"], noises[2 * k + 2])
            skip = rgb(x, styles[f"to_rgbs.{k}"], skip)
        return skip

    # ----- F/W+ space (BDInvert) ----------------------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if level not in self.resolutions[1:]:
            raise ValueError(f"base-code level must be one of {self.resolutions[1:]}, got {level}")

    def base_code(self, wplus: torch.Tensor, level: int, noise="const",
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """F = output of the up-sampling StyledConv at resolution `level` -> [B, C_level, level, level]."""
        self._check_level(level)
        styles = self.styles(wplus)
        batch = styles["conv1"].shape[0]
        noises = self.make_noise(batch, noise, generator)
        x = self.conv1(self.input(batch), styles["conv1"], noises[0])
        return self._run_blocks(x, None, styles, noises, start=8, stop_after_up=level)

    def synthesis_from_base_code(self, base: torch.Tensor, wplus: torch.Tensor, level: int, noise="const",
                                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Restart generation from F at `level` (BDInvert G_F): W+ rows that feed earlier layers have no effect."""
        self._check_level(level)
        styles = self.styles(wplus)
        noises = self.make_noise(base.shape[0], noise, generator)
        return self._run_blocks(None, None, styles, noises, start=level, restart_feature=base)

    def forward(self, wplus: torch.Tensor, noise="const", generator: torch.Generator | None = None) -> torch.Tensor:
        return self.synthesis(wplus, noise=noise, generator=generator)

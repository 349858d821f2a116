"""The general rule, beyond the golden sizes: our Generator against an independent, literal re-statement of the
official per-sample computation (grouped convolutions with modulated+demodulated weights, transposed-conv
up-sampling, FIR filters by transposed convolution), at other sizes, widths and seeds."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.stylegan2 import Generator, default_channels


def perturbed_generator(size, seed, **kwargs):
    torch.manual_seed(seed)
    G = Generator(size, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("bias") or name.endswith("noise.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return G.eval()


def ref_lrelu(x, bias):
    return F.leaky_relu(x + bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)


def ref_modconv(x, layer, w, demod=True, up=False):
    """Rosinality's fused path: one weight per sample, grouped convolution."""
    b, cin, h, wd = x.shape
    weight = layer.weight  # [1, O, I, k, k]
    k = weight.shape[-1]
    s = F.linear(w, layer.modulation.weight / math.sqrt(w.shape[1]), layer.modulation.bias)
    wt = weight / math.sqrt(cin * k * k) * s.view(b, 1, cin, 1, 1)
    if demod:
        wt = wt * torch.rsqrt(wt.pow(2).sum([2, 3, 4]) + 1e-8).view(b, -1, 1, 1, 1)
    cout = wt.shape[1]
    xg = x.reshape(1, b * cin, h, wd)
    if up:
        wt = wt.transpose(1, 2).reshape(b * cin, cout, k, k)
        out = F.conv_transpose2d(xg, wt, stride=2, groups=b).view(b, cout, 2 * h + 1, 2 * wd + 1)
        fir = 4 * torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64
        out = F.conv2d(F.pad(out, [1, 1, 1, 1]), fir.expand(cout, 1, 4, 4), groups=cout)
        return out
    out = F.conv2d(xg, wt.reshape(b * cout, cin, k, k), padding=k // 2, groups=b)
    return out.view(b, cout, h, wd)


def ref_upsample_rgb(skip):
    """Zero insertion + pad (2,1) + 4x4 FIR equals a stride-2 transposed conv cropped by one pixel."""
    fir = 4 * torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64
    out = F.conv_transpose2d(skip, fir.expand(3, 1, 4, 4), stride=2, groups=3)
    return out[:, :, 1:-1, 1:-1]


def ref_synthesis(G, wplus, noises):
    b = wplus.shape[0]

    def styled(layer, x, w, noise, up=False):
        out = ref_modconv(x, layer.conv, w, up=up) + layer.noise.weight * noise
        return ref_lrelu(out, layer.activate.bias)

    def rgb(layer, x, w, skip):
        out = ref_modconv(x, layer.conv, w, demod=False) + layer.bias
        return out if skip is None else out + ref_upsample_rgb(skip)

    x = G.input.input.repeat(b, 1, 1, 1)
    x = styled(G.conv1, x, wplus[:, 0], noises[0])
    skip = rgb(G.to_rgb1, x, wplus[:, 1], None)
    for k in range(len(G.to_rgbs)):
        x = styled(G.convs[2 * k], x, wplus[:, 2 * k + 1], noises[2 * k + 1], up=True)
        x = styled(G.convs[2 * k + 1], x, wplus[:, 2 * k + 2], noises[2 * k + 2])
        skip = rgb(G.to_rgbs[k], x, wplus[:, 2 * k + 3], skip)
    return skip


@pytest.mark.parametrize("size,seed,kwargs", [
    (8, 3, {"style_dim": 16, "n_mlp": 1, "channels": {4: 8, 8: 6}}),
    (64, 7, {"style_dim": 32, "n_mlp": 3, "channels": {4: 32, 8: 24, 16: 16, 32: 12, 64: 8}}),
    (128, 11, {"style_dim": 24, "n_mlp": 2, "channel_multiplier": 1}),
])
def test_synthesis_matches_reference_statement(size, seed, kwargs):
    if "channel_multiplier" in kwargs:  # keep the default widths but small enough for CPU
        kwargs = {**kwargs, "channels": {r: max(4, c // 32) for r, c in default_channels(size, 1).items()}}
    G = perturbed_generator(size, seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 2)
    wplus = torch.randn(3, G.n_latent, G.style_dim, generator=gen)
    noises = G.make_noise(3, "random", generator=gen)
    with torch.no_grad():
        ours = G.synthesis(wplus, noise=noises)
        ref = ref_synthesis(G, wplus, noises)
    assert ours.shape == (3, 3, size, size)
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_default_channels_are_the_official_config_f_and_e():
    assert default_channels(1024, 2) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64,
                                         1024: 32}
    assert default_channels(256, 1) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64}


def test_base_code_restart_ignores_coarse_rows_and_reproduces_synthesis():
    G = perturbed_generator(64, 5, style_dim=16, n_mlp=1, channels={4: 16, 8: 16, 16: 8, 32: 8, 64: 4})
    wplus = torch.randn(2, G.n_latent, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for level in (8, 16, 32):
            f = G.base_code(wplus, level)
            assert f.shape == (2, G.channels[level], level, level)
            first_free_row = 2 * int(math.log2(level)) - 4  # rows < this feed only layers before the restart
            other = wplus.clone()
            other[:, :first_free_row] = torch.randn_like(other[:, :first_free_row])
            a = G.synthesis_from_base_code(f, wplus, level)
            b = G.synthesis_from_base_code(f, other, level)
            assert torch.equal(a, b)
            changed = wplus.clone()
            changed[:, first_free_row] += 1
            assert (G.synthesis_from_base_code(f, changed, level) - a).abs().max() > 1e-3
    with pytest.raises(ValueError, match="level"):
        G.base_code(wplus, 4)


def test_truncation_on_w_and_wplus():
    w_avg = torch.randn(8)
    w = torch.randn(3, 8)
    assert torch.allclose(Generator.truncate(w, w_avg, 0.0), w_avg.expand(3, 8))
    assert torch.allclose(Generator.truncate(w, w_avg, 1.0), w, atol=1e-6)
    wp = torch.randn(3, 5, 8)
    assert torch.allclose(Generator.truncate(wp, w_avg[None], 0.5), (wp + w_avg) / 2)


def test_style_layer_table_offsets_and_rows():
    G = Generator(32, style_dim=8, n_mlp=1, channels={4: 8, 8: 8, 16: 4, 32: 4})
    rows = [(layer.name, layer.width, layer.offset, layer.w_index) for layer in G.style_layers]
    assert rows == [("conv1", 8, 0, 0), ("to_rgb1", 8, 8, 1), ("convs.0", 8, 16, 1), ("convs.1", 8, 24, 2),
                    ("to_rgbs.0", 8, 32, 3), ("convs.2", 8, 40, 3), ("convs.3", 4, 48, 4), ("to_rgbs.1", 4, 52, 5),
                    ("convs.4", 4, 56, 5), ("convs.5", 4, 60, 6), ("to_rgbs.2", 4, 64, 7)]
    assert G.n_styles == 68
    s = torch.randn(2, 68)
    assert torch.equal(G.styles_to_vector(G.vector_to_styles(s)), s)


def test_cpu_autocast_bfloat16_stays_close():
    """Under autocast the convolutions run in low precision but demodulation stays float32: no overflow, small error."""
    G = perturbed_generator(32, 1, style_dim=16, n_mlp=1, channels={4: 16, 8: 16, 16: 8, 32: 8})
    wplus = torch.randn(2, G.n_latent, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = G.synthesis(wplus)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = G.synthesis(wplus)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()

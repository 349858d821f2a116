"""Each edit's defining property (spec: inversion.md §6, stylespace.md §2, bdinvert.md §4.2)."""

import pytest
import torch

from ops.geometry import similarity_warp
from ops.edit import (Edit, interpolate, latent_arithmetic, move_along_direction, shift_channel, style_mix,
                      transform_base_code)


def wplus_pair(G, seed=0):
    z = torch.randn(2 * 2 * G.n_latent, G.style_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        w = G.mapping(z).reshape(2, 2, G.n_latent, G.style_dim)
    return w[0], w[1]


def test_direction_moves_only_the_chosen_rows_by_strength_times_direction(G):
    a, _ = wplus_pair(G)
    d = torch.randn(G.style_dim)
    assert torch.equal(move_along_direction(a, d, 0.0), a)
    out = move_along_direction(a, d, 2.5, layers=(2, 5))
    torch.testing.assert_close(out[:, 2:5], a[:, 2:5] + 2.5 * d, rtol=0, atol=1e-6)
    assert torch.equal(out[:, :2], a[:, :2]) and torch.equal(out[:, 5:], a[:, 5:])
    per_row = torch.randn(G.n_latent, G.style_dim)
    torch.testing.assert_close(move_along_direction(a, per_row, -1.0), a - per_row)
    with pytest.raises(ValueError, match="does not fit"):
        move_along_direction(a, torch.randn(3, G.style_dim), 1.0)


def test_channel_edit_changes_exactly_one_channel_of_s(G):
    a, _ = wplus_pair(G)
    with torch.no_grad():
        s = G.styles_to_vector(G.styles(a))
    out = shift_channel(s, 17, 5.0, 0.3)
    changed = (out != s).nonzero()[:, 1].unique()
    assert changed.tolist() == [17]
    torch.testing.assert_close(out[:, 17] - s[:, 17], torch.full((2,), 1.5), rtol=0, atol=1e-6)


def test_interpolation_arithmetic_and_mixing_endpoints(G):
    a, b = wplus_pair(G)
    assert torch.equal(interpolate(a, b, 0.0), a)
    torch.testing.assert_close(interpolate(a, b, 1.0), b)
    torch.testing.assert_close(interpolate(a, b, 0.5), (a + b) / 2)
    assert torch.equal(latent_arithmetic(a, b, b, 3.0), a)
    torch.testing.assert_close(latent_arithmetic(a, a, b, 1.0), b, rtol=0, atol=1e-5)
    assert torch.equal(style_mix(a, b, 0), b) and torch.equal(style_mix(a, b, G.n_latent), a)
    mixed = style_mix(a, b, 4)
    assert torch.equal(mixed[:, :4], a[:, :4]) and torch.equal(mixed[:, 4:], b[:, 4:])
    with pytest.raises(ValueError):
        style_mix(a, b, G.n_latent + 1)


def test_shifting_the_base_code_by_one_cell_moves_the_image_by_size_over_level_pixels(G):
    """Zero noise (constant noise is fixed in image space, so it would not move with F); compared away from borders."""
    a, _ = wplus_pair(G)
    level = 16
    px = G.size // level
    with torch.no_grad():
        f = G.base_code(a, level, noise="zero")
        image = G.synthesis_from_base_code(f, a, level, noise="zero")
        moved = G.synthesis_from_base_code(transform_base_code(f, G.size, shift=(px, 0)), a, level, noise="zero")
        up = G.synthesis_from_base_code(transform_base_code(f, G.size, shift=(0, -px)), a, level, noise="zero")
    # The layers after F see ~3 cells around every pixel: the vacated cell and the image border change only that
    # band. Beyond it the result is the same picture, moved (float rounding only). Zero-noise images of the bundled
    # generator are faint, so tolerances are relative to their range.
    m, scale = 16, image.abs().max().item()
    torch.testing.assert_close(moved[..., px + m:-m], image[..., m:-px - m], rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(up[..., m:-px - m, :], image[..., px + m:-m, :], rtol=0, atol=1e-4 * scale)
    assert (moved - image).abs().max() > 0.1 * scale  # it did move
    # whole cells move exactly (an integer shift); the same shift through the bilinear warp agrees
    warped = similarity_warp(f, shift=(px / G.size, 0.0))
    torch.testing.assert_close(transform_base_code(f, G.size, shift=(px, 0)), warped, rtol=0, atol=1e-5)
    assert torch.equal(transform_base_code(f, G.size), f)


def test_edit_config_is_validated():
    with pytest.raises(ValueError, match="kind"):
        Edit(kind="warp")
    with pytest.raises(ValueError, match="strengths"):
        Edit(kind="mix", strengths=())

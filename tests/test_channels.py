"""Channel statistics: streaming aggregates against numpy, attribute ranking on a planted population, gradient maps
against finite differences, region scores on analytic maps."""

import numpy as np
import torch

from models.default_generator import load_default_generator
from ops.channels import (REGIONS, RunningStats, attribute_scores, channel_table, gradient_maps, landmark_masks,
                          majority_masks, region_frequency, region_scores, select_local_channels)


def test_streaming_stats_merge_to_the_numpy_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 50)) * rng.uniform(0.1, 10, size=50)
    parts = [RunningStats(50).update(x[a:b]) for a, b in [(0, 1), (1, 333), (333, 334), (334, 1000)]]
    total = RunningStats(50)
    for p in parts[::-1]:  # any order, any block sizes
        total.merge(RunningStats.from_state(p.state()))
    assert total.count == 1000
    np.testing.assert_allclose(total.mean_, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(total.std(), x.std(0), rtol=1e-10)


def test_planted_attribute_channels_rank_first_in_order():
    rng = np.random.default_rng(1)
    population = rng.normal(size=(5000, 300)) * 2 + 1
    mean, std = population.mean(0), population.std(0)
    exemplars = population[rng.choice(5000, 40, replace=False)].copy()
    planted = {7: 3.0, 42: -2.5, 99: 2.0}  # shift in population stds; exemplars concentrated around it
    for c, shift in planted.items():
        exemplars[:, c] = mean[c] + std[c] * (shift + 0.25 * rng.normal(size=40))
    scores = attribute_scores(exemplars, mean, std)
    assert list(np.argsort(-scores["theta"])[:3]) == [7, 42, 99]
    d = (exemplars - mean) / std
    np.testing.assert_allclose(scores["theta"], np.abs(d.mean(0)) / d.std(0))
    assert np.sign(scores["exemplar_mean"][42]) == -1


def test_channel_table_names_channels_by_layer_and_sorts_by_theta():
    G = load_default_generator()
    theta = np.zeros(G.n_styles)
    last = G.style_layers[-1]
    theta[last.offset + 2] = 5.0
    theta[3] = 1.0
    table = channel_table(G.style_layers, {"theta": theta}, n=10)
    assert (table["layer"][0], table["channel"][0], table["index"][0]) == (last.name, 2, last.offset + 2)
    assert table["is_torgb"][0] == last.is_torgb and table["index"][1] == 3
    assert np.all(np.diff(table["theta"]) <= 0) and set(table["n"]) == {10}


def test_gradient_maps_match_finite_differences():
    G = load_default_generator().double()
    with torch.no_grad():
        s = G.styles_to_vector(G.styles(G.mapping(torch.randn(1, G.style_dim, dtype=torch.float64,
                                                               generator=torch.Generator().manual_seed(0)))))
    channels = [0, 300, G.style_layers[-2].offset + 1]
    maps = gradient_maps(G, s.float().double(), channels, grid=16)
    eps = 1e-6  # float64 throughout: small enough to stay between leaky-ReLU kinks
    for j, c in enumerate(channels):
        plus, minus = s.clone(), s.clone()
        plus[0, c] += eps
        minus[0, c] -= eps
        with torch.no_grad():
            pool = lambda v: torch.nn.functional.avg_pool2d(G.synthesis_from_styles(v, noise="zero"), G.size // 16)
            fd = ((pool(plus) - pool(minus)) / (2 * eps)).abs().mean(1)[0].numpy()
        np.testing.assert_allclose(maps[0, j], fd, rtol=1e-4, atol=1e-8)


def test_region_scores_pick_the_region_a_map_lights_up():
    masks = np.zeros((3, 8, 8), dtype=np.int64)
    masks[:, 2:4, 2:6] = 1  # region 1: 8 cells
    masks[:, 5:7, 1:3] = 2  # region 2: 4 cells
    masks[2, 5:7, 1:3] = 0  # absent from image 2
    maps = np.zeros((3, 3, 8, 8))
    maps[:, 0] = masks == 1  # channel 0 lights region 1
    maps[:, 1] = (masks == 2) * 2.0  # channel 1 lights region 2 where present
    maps[:, 2] = np.random.default_rng(0).random((3, 8, 8))
    scores = region_scores(maps, masks, 3)
    np.testing.assert_allclose(scores[:, 0, 1], 1 / 8)  # n = o = 8
    np.testing.assert_allclose(scores[:2, 1, 2], 1 / 4)
    assert np.isnan(scores[2, :, 2]).all()
    freq = region_frequency(scores)
    np.testing.assert_allclose(freq[0], [0, 1, 0])
    assert freq[1, 2] == 1.0  # both images that have region 2
    order, a = select_local_channels(freq, [2])
    assert order.tolist() == [1] and a.tolist() == [1.0]


def test_landmark_masks_put_eyes_above_the_mouth():
    lm = np.zeros((68, 2))
    lm[0:17] = np.stack([np.linspace(8, 56, 17), 30 + 20 * np.sin(np.linspace(0, np.pi, 17))], 1)  # jaw
    lm[17:27] = np.stack([np.linspace(14, 50, 10), np.full(10, 18.0)], 1)  # brows
    lm[27:36] = [[32, 24], [32, 28], [32, 31], [32, 34], [28, 37], [30, 38], [32, 38], [34, 38], [36, 37]]
    ring = np.array([[-4, 0], [-2, -2], [2, -2], [4, 0], [2, 2], [-2, 2]], float)
    lm[36:42], lm[42:48] = ring + [22, 24], ring + [42, 24]
    lm[48:60] = np.stack([32 + 8 * np.cos(np.linspace(0, 2 * np.pi, 13)[:-1]),
                          44 + 3 * np.sin(np.linspace(0, 2 * np.pi, 13)[:-1])], 1)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    masks = landmark_masks(lm[None], identity[None], size=64, grid=32)[0]
    eyes = np.argwhere(masks == REGIONS.index("eyes"))
    mouth = np.argwhere(masks == REGIONS.index("mouth"))
    assert len(eyes) and len(mouth) and eyes[:, 0].max() < mouth[:, 0].min()
    np.testing.assert_allclose(eyes[:, 0].mean(), 12, atol=1.5)  # eye centres at y = 24 px = 12 cells
    assert (masks == REGIONS.index("face")).sum() > (masks == REGIONS.index("mouth")).sum()
    assert (landmark_masks(np.full((1, 68, 2), np.nan), identity[None], 64)[0] == 0).all()


def test_label_maps_are_voted_down_by_majority():
    labels = np.zeros((1, 4, 4), dtype=np.int64)
    labels[0, :2, :2] = [[1, 1], [1, 2]]  # block (0, 0): 1 wins 3-1
    labels[0, :2, 2:] = [[2, 2], [0, 0]]  # block (0, 1): a tie between 0 and 2 goes to 0
    labels[0, 2:, 2:] = 2
    np.testing.assert_array_equal(majority_masks(labels, 2, 3)[0], [[1, 0], [0, 2]])

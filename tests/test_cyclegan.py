"""CycleGAN generator against the official goldens: strict key layout, outputs, legacy InstanceNorm stats, uint8
conversion, pre-processing, and clear errors for checkpoints of another kind."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import key_listing, reference_file
from models.checkpoints import CheckpointError
from models.cyclegan import ResnetGenerator, load_cyclegan
from ops.translate import preprocess, to_uint8_truncated


@pytest.fixture(scope="module")
def cases():
    return torch.load(reference_file("cyclegan/small_cases.pt"), weights_only=True)


@pytest.mark.parametrize("name", ["small_net_G_A.pth", "small_net_G_A_legacy_instnorm_stats.pth"])
def test_official_small_generator_reproduces_the_golden(cases, name):
    G = load_cyclegan(str(reference_file(f"cyclegan/{name}")))
    assert G.config == dict(in_channels=3, out_channels=3, ngf=8, norm="instance", dropout=False, n_blocks=2)
    with torch.no_grad():
        out = G(cases["input"])
        odd = G(cases["input_60x76"])
    assert (out - cases["output"]).abs().max() <= 1e-5
    assert odd.shape == (1, 3, 60, 76) and (odd - cases["output_60x76"]).abs().max() <= 1e-5
    assert np.abs(to_uint8_truncated(out).astype(int) - cases["output_uint8_hwc"].numpy()).max() <= 1


def test_uint8_conversion_truncates_like_tensor2im():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    np.testing.assert_array_equal(to_uint8_truncated(x)[0, 0, :, 0], [0, 0, 127, 254, 255])


@pytest.mark.parametrize("keys_file,config", [
    ("keys_resnet_9blocks_ngf64.txt", dict(ngf=64, n_blocks=9)),
    ("keys_small_resnet_2blocks_ngf8.txt", dict(ngf=8, n_blocks=2))])
def test_key_listings_match_our_module(keys_file, config):
    listed = key_listing(f"cyclegan/{keys_file}")
    ours = {k: tuple(v.shape) for k, v in ResnetGenerator(**config).state_dict().items()}
    assert ours == listed


def test_preprocessing_follows_the_official_test_options():
    photo = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    squashed = preprocess(photo)
    expected = np.asarray(Image.fromarray(photo).resize((256, 256), Image.BICUBIC), np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(squashed.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    # nearest multiples of 4 with Python round (half to even: 12.5 -> 12, 17.5 -> 18), as upstream computes it
    assert preprocess(photo, "none").shape == (3, 48, 72)
    assert preprocess(photo[:48, :68], "none").shape == (3, 48, 68)


def test_wrong_checkpoints_are_named(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="expected keys model.1.weight"):
        load_cyclegan(str(tmp_path / "other.pth"))
    state = torch.load(reference_file("cyclegan/small_net_G_A.pth"), weights_only=True)
    del state["model.10.conv_block.5.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_cyclegan(str(tmp_path / "broken.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_cyclegan(str(tmp_path / "junk.pth"))

"""CycleGAN ResNet and pix2pix U-Net generators against the official goldens: strict key layouts, outputs in eval
mode and with batch statistics, legacy InstanceNorm stats, seeded dropout, uint8 conversion, pre-processing, and
clear errors for checkpoints of another kind."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import key_listing, reference_file
from models.checkpoints import CheckpointError
from models.translation import ResnetGenerator, UnetGenerator, load_translator, translate
from ops.translate import preprocess, to_uint8_truncated


@pytest.fixture(scope="module")
def cases():
    return torch.load(reference_file("cyclegan/small_cases.pt"), weights_only=True)


@pytest.mark.parametrize("name", ["small_net_G_A.pth", "small_net_G_A_legacy_instnorm_stats.pth"])
def test_official_small_generator_reproduces_the_golden(cases, name):
    G = load_translator(str(reference_file(f"cyclegan/{name}")))
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
    with pytest.raises(CheckpointError, match="neither a CycleGAN ResnetGenerator"):
        load_translator(str(tmp_path / "other.pth"))
    state = torch.load(reference_file("cyclegan/small_net_G_A.pth"), weights_only=True)
    del state["model.10.conv_block.5.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_translator(str(tmp_path / "broken.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_translator(str(tmp_path / "junk.pth"))


# ----- pix2pix U-Net -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pix2pix_cases():
    with torch.serialization.safe_globals([np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                                           type(np.dtype("uint8"))]):
        return torch.load(reference_file("pix2pix/cases.pt"), weights_only=True)


def test_unet_key_listings_match_our_module():
    for name, model in (("pix2pix/keys.txt", UnetGenerator.official(num_downs=6, ngf=8, dropout=True)),
                        ("cyclegan/keys_unet_256_ngf64.txt", UnetGenerator.official()),
                        ("cyclegan/keys_unet_256_ngf64_instancenorm.txt", UnetGenerator.official(norm="instance"))):
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == key_listing(name), name


def test_pix2pix_goldens_in_eval_mode_with_batch_statistics_and_with_instance_norm(pix2pix_cases):
    c = pix2pix_cases
    x = c["input"]
    unet = str(reference_file("pix2pix/unet_batch_dropout_net_G.pth"))
    with torch.no_grad():
        G = load_translator(unet)  # eval: test.py --eval
        assert G.kind == "unet" and G.config["num_downs"] == 6 and G.config["norm"] == "batch"
        out = G(x)
        assert (out - c["batch_dropout_eval"]).abs().max() <= 1e-5
        assert np.array_equal(to_uint8_truncated(out), np.asarray(c["uint8_hwc_batch_dropout_eval"]))
        # test.py without --eval (dropout off here): BatchNorm on the statistics of a batch of one image
        stats = load_translator(unet, batch_stats=True)
        both = translate(stats, x)
        assert (both - c["batch_trainmode_bs1"]).abs().max() <= 1e-5
        assert (translate(stats, x[1:]) - both[1:]).abs().max() == 0  # a row alone = the row in its batch
        assert all(torch.equal(a, b) for a, b in zip(stats.state_dict().values(), G.state_dict().values()))
        inst = load_translator(str(reference_file("pix2pix/unet_instance_net_G.pth")))
        assert inst.config["norm"] == "instance"
        assert (inst(x) - c["instance"]).abs().max() <= 1e-5


def test_pix2pix_dropout_is_active_only_when_asked_and_seeded_per_row(pix2pix_cases):
    from ops.invert import key_generator

    x = pix2pix_cases["input"]
    G = load_translator(str(reference_file("pix2pix/unet_batch_dropout_net_G.pth")), dropout=True)
    with torch.no_grad():
        a = translate(G, x, [key_generator(0, "a"), key_generator(0, "b")])
        again = translate(G, x, [key_generator(0, "a"), key_generator(0, "b")])
        other = translate(G, x, [key_generator(0, "c"), key_generator(0, "b")])
        alone = translate(G, x[1:], [key_generator(0, "b")])
        plain = load_translator(str(reference_file("pix2pix/unet_batch_dropout_net_G.pth")))(x)
    assert torch.equal(a, again) and torch.equal(a[1:], alone) and torch.equal(a[1], other[1])
    assert not torch.equal(a[0], other[0]) and (a - plain).abs().max() > 1e-4  # float noise is ~1e-7

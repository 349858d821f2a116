"""ArcFace IR-SE50 against the official goldens (pSp's IDLoss on TreB1eN's backbone)."""

import pytest
import torch

from conftest import key_listing, reference_file
from models.checkpoints import CheckpointError
from models.identity import ArcFace, load_arcface


@pytest.fixture(scope="module")
def cases():
    return torch.load(reference_file("encoders/small_encoder_cases.pt"), weights_only=True)


def test_small_arcface_reproduces_the_golden_features(cases):
    net = load_arcface(str(reference_file("encoders/small_arcface_ir_se.pth")))
    with torch.no_grad():
        assert (ArcFace.face_crop(cases["x"]) - cases["arcface_pooled_x"]).abs().max() <= 1e-6
        fx, fy = net(cases["x"]), net(cases["y_hat"])
    assert (fx - cases["arcface_feat_x"]).abs().max() <= 1e-5
    assert (fy - cases["arcface_feat_y_hat"]).abs().max() <= 1e-5
    loss = (1 - (fy * fx).sum(1)).mean()
    assert abs(loss - cases["id_loss_y_hat_vs_x"]) <= 1e-5
    # 1024-px faces are block-averaged to 256 first: the same embedding as the 256 image
    with torch.no_grad():
        big = net(torch.nn.functional.interpolate(cases["x"], scale_factor=4, mode="nearest"))
    assert (big - fx).abs().max() <= 1e-5


def test_full_size_key_listing_matches():
    listed = key_listing("encoders/keys_arcface_ir_se50.txt")
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in ArcFace([64, 128, 256, 512]).state_dict().items()}
    assert ours == listed


def test_other_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="expected an ArcFace"):
        load_arcface(str(reference_file("cyclegan/small_net_G_A.pth")))

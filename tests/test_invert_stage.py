"""The invert stage's contract without Ray: same rows, same order, failed rows untouched, NaN tensors, per-space
column groups, and a row's result independent of the batch it lands in."""

import numpy as np
import pytest
import torch

from models.default_generator import load_default_generator
from ops.align import center_crop_resize
from ops.invert import InvertConfig
from ops.invert_stage import InvertStage, InvertStageConfig

CFG = InvertStageConfig(spaces=("wplus", "fwplus"),
                        invert=InvertConfig(steps=4, base_level=8, lpips_net="alex", lpips_backbone="random"))


@pytest.fixture(scope="module")
def stage():
    st = InvertStage(CFG)
    st.ready()
    return st


def rows(n, failed=()):
    G = load_default_generator()
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = ((G.synthesis(G.mapping(z)).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    batch = {"key": np.array([f"k{i}" for i in range(n)], dtype=object),
             "status": np.array(["ok"] * n, dtype=object), "error_code": np.array([""] * n, dtype=object),
             "error": np.array([""] * n, dtype=object), "image": img.permute(0, 2, 3, 1).numpy()}
    for i in failed:
        batch["status"][i], batch["error_code"][i], batch["error"][i] = "failed", "decode_error", "broken"
    return batch


def test_process_keeps_rows_and_fills_column_groups(stage):
    batch = rows(3, failed=[1])
    out = stage.process(batch)
    assert list(out["key"]) == ["k0", "k1", "k2"]
    assert list(out["status"]) == ["ok", "failed", "ok"] and out["error_code"][1] == "decode_error"
    G = stage.G
    assert out["wplus"].shape == (3, G.n_latent, G.style_dim) and out["wplus"].dtype == np.float32
    assert out["fwplus_base_code"].shape == (3, G.channels[8], 8, 8)
    assert np.isnan(out["wplus"][1]).all() and np.isnan(out["fwplus_psnr"][1])
    assert np.isfinite(out["wplus"][[0, 2]]).all() and np.isfinite(out["wplus_psnr"][[0, 2]]).all()
    assert set(out["lpips_backbone"]) == {"random"} and set(out["lpips_net"]) == {"alex"}
    assert batch["status"][1] == "failed" and "wplus" not in batch  # the input batch is not mutated


def test_row_result_does_not_depend_on_its_batch(stage):
    full = stage.process(rows(3))
    alone = stage.process({k: v[2:3] for k, v in rows(3).items()})
    assert np.array_equal(full["wplus"][2], alone["wplus"][0])
    assert np.array_equal(full["fwplus_base_code"][2], alone["fwplus_base_code"][0])


def test_bad_config_raises_before_any_row():
    with pytest.raises(ValueError, match="spaces must be"):
        InvertStage(InvertStageConfig(spaces=("z",)))
    with pytest.raises(ValueError, match="needs an image loss"):
        InvertStage(InvertStageConfig(invert=InvertConfig(lpips_weight=0)))  # W+ has no MSE by default


def test_mse_only_inversion_needs_no_lpips_backbone(tmp_path, monkeypatch):
    """lpips_weight 0: no backbone is built (an empty torch hub cache is fine), the LPIPS metric is NaN and the
    rows say `none`; the other metrics are real."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no ImageNet weights here: building LPIPS would refuse
    stage = InvertStage(InvertStageConfig(invert=InvertConfig(steps=3, lpips_weight=0, mse_weight=1)))
    stage.ready()
    out = stage.process(rows(2, failed=[1]))
    assert list(out["status"]) == ["ok", "failed"] and set(out["lpips_backbone"]) == {"none"}
    assert np.isnan(out["wplus_lpips"]).all() and np.isfinite(out["wplus_psnr"][0])


def test_larger_crops_are_reduced_to_the_generator_resolution(stage):
    """A 128-px crop of a 64-px model's image is Lanczos-reduced first: same result as giving the 64-px image."""
    from PIL import Image

    batch = rows(1)
    big = np.asarray(Image.fromarray(batch["image"][0]).resize((128, 128), Image.LANCZOS))
    small = np.asarray(Image.fromarray(big).resize((64, 64), Image.LANCZOS))
    a = stage.process({**batch, "image": big[None]})
    b = stage.process({**batch, "image": small[None]})
    assert np.array_equal(a["wplus"], b["wplus"])
    out = stage.process({**batch, "image": batch["image"][:, :32, :32]})  # too small: the row fails, says why
    assert out["status"][0] == "failed" and "cannot feed" in out["error"][0]


def test_center_crop_resize_box():
    img = np.zeros((40, 100, 3), dtype=np.uint8)
    img[:, 30:70] = 255  # the centre square
    aligned = center_crop_resize(img, 16)
    assert aligned.image.shape == (16, 16, 3) and aligned.image.min() == 255
    # the transform maps the crop's corner pixels onto the photo's square (30..69, 0..39), 2.5 px per aligned pixel
    corners = aligned.transform @ np.array([[0, 0, 1], [15, 15, 1]], float).T
    np.testing.assert_allclose(corners.T, [[30.75, 0.75], [68.25, 38.25]])

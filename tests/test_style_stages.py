"""`latentray destylize` and `latentray stylize` end to end on local Ray with the seeded companion models, chained in
a run file: every input once, bad and faceless inputs failed with a reason, stored codes and images consistent."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_parts, tensor
from corpus import face_corpus
from models.companions import write_all
from models.default_generator import load_default_generator
from ops.images import decode_png
from pipelines.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("style")
    models = write_all(str(root / "models"))
    portraits = root / "portraits"
    portraits.mkdir()
    for name in ("face.png", "ok.jpg", "text.jpg"):  # a face, an image without one, an undecodable file
        (portraits / name).write_bytes(face_corpus()[name][0])
    fast = "lpips-net: alex, lpips-backbone: random"
    (root / "p.yaml").write_text(f"""
stages:
  - {{stage: destylize, input: {portraits}, output: {root / 'pairs'}, finetuned: {models['finetuned']},
     encoder: {models['encoder']}, identity: {models['identity']}, steps: 5, {fast}}}
  - {{stage: stylize, input: {portraits}, output: {root / 'styled'}, dualstylegan: {models['dualstylegan']},
     encoder: {models['encoder']}, exstyles: {models['exstyles']}, styles: "0,style2.png"}}
""")
    assert main(["run", str(root / "p.yaml")]) == 0
    return root, models


def test_destylized_pairs(run):
    root, _ = run
    table = read_parts(root / "pairs")
    rows = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    assert sorted(rows) == ["face.png", "ok.jpg", "text.jpg"]
    codes = dict(zip(table.column("key").to_pylist(), table.column("error_code").to_pylist()))
    assert codes == {"face.png": "", "ok.jpg": "no_face", "text.jpg": "decode_error"}
    i = rows["face.png"]
    z_e, z_hat, z_i = (tensor(table, c)[i] for c in ("z_e", "z_hat", "z_i"))
    assert z_e.shape == (10, 128) and np.array_equal(z_hat[8:], z_e[8:]) and np.array_equal(z_i[8:], z_e[8:])
    assert np.isnan(tensor(table, "z_e")[rows["ok.jpg"]]).all()
    assert table.column("id_weight").to_pylist()[i] == pytest.approx(0.1)
    assert -1 <= table.column("id_sim").to_pylist()[i] <= 1 and table.column("lpips").to_pylist()[i] > 0
    G = load_default_generator()
    face = decode_png(table.column("face_png")[i].as_py())
    with torch.no_grad():  # the stored face is g(z_i) up to the run's (unstored) noise maps: same layout and range
        again = G.synthesis(0.7 * G.mapping(torch.from_numpy(z_i)))[0]
    assert face.shape == (64, 64, 3) and again.shape == (3, 64, 64)
    assert decode_png(table.column("portrait_png")[i].as_py()).shape == (256, 256, 3)
    assert list((root / "pairs" / "previews").glob("*.png"))


def test_stylized_faces_by_style(run):
    root, models = run
    from models.dualstylegan import load_dualstylegan, load_exstyle_codes
    from models.encoders import load_style_encoder

    table = read_parts(root / "styled")
    keys = sorted(table.column("key").to_pylist())
    assert keys == [f"{k}|{s}" for k in ("face.png", "ok.jpg", "text.jpg") for s in ("style0.png", "style2.png")]
    status = dict(zip(table.column("key").to_pylist(), table.column("status").to_pylist()))
    codes = dict(zip(table.column("key").to_pylist(), table.column("error_code").to_pylist()))
    assert status["face.png|style2.png"] == "ok" and status["ok.jpg|style0.png"] == "failed"
    assert codes["ok.jpg|style0.png"] == "no_face" and codes["text.jpg|style2.png"] == "decode_error"  # kept
    # the stored image is the official call on the aligned face: G([E(face)], map(code), z+, 0.75, weights)
    aligned = read_parts(root / "pairs")  # same alignment (ffhq at 256) as the destylize run
    face = decode_png(aligned.column("portrait_png")[aligned.column("key").to_pylist().index("face.png")].as_py())
    x = torch.from_numpy(face.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    g, enc = load_dualstylegan(models["dualstylegan"]), load_style_encoder(models["encoder"])
    code = torch.from_numpy(load_exstyle_codes(models["exstyles"])["style2.png"])
    with torch.no_grad():
        ex = g.generator.mapping(code.reshape(-1, 128)).reshape(1, 10, 128)
        want, _ = g([enc(x)], ex, z_plus_latent=True, truncation=0.75, truncation_latent=0, randomize_noise=False,
                    interp_weights=[0.75] * 7 + [1.0] * 3)
    want = ((want.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    got = decode_png(table.column("image_png")[table.column("key").to_pylist().index("face.png|style2.png")].as_py())
    assert np.abs(got.astype(float) - want).max() <= 1
    grid = np.asarray(Image.open(root / "styled" / "previews" / "styles.png"))
    assert grid.shape[1] > grid.shape[0]  # one face row, two style columns


def test_a_batch_that_cannot_be_destylized_fails_its_rows_not_the_job(run):
    from ops.destylize import DestylizeConfig, DestylizeStage, DestylizeStageConfig
    root, models = run
    stage = DestylizeStage(DestylizeStageConfig(models["finetuned"], models["encoder"], destylize=DestylizeConfig(
        steps=1, lr=float("nan"), lpips_net="alex", lpips_backbone="random")))
    stage.ready()
    image = np.zeros((2, 256, 256, 3), np.uint8)
    batch = {"key": np.array(["k", "gone"], dtype=object), "status": np.array(["ok", "failed"], dtype=object),
             "error_code": np.array(["", "read_error"], dtype=object), "error": np.array(["", "x"], dtype=object),
             "image": image}
    out = stage.process(batch)
    assert (out["status"][0], out["error_code"][0]) == ("failed", "destylize_error")
    assert "learning rate" in out["error"][0]
    assert np.isnan(out["z_i"][0]).all() and out["face_png"][0] == b""
    assert (out["status"][1], out["error_code"][1], out["error"][1]) == ("failed", "read_error", "x")  # untouched

"""DCI: an axis-aligned code scores high, the same code rotated scores far lower; D, C and I agree with an
independent numpy computation; the `dci` stage on an invert output, one row per space."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ops.dci import dci, disentanglement_completeness


def synthetic(n=600, seed=0):
    """4 independent factors, each carried by one code dimension (plus noise), and 4 pure-noise dimensions."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 4))
    codes = np.concatenate([factors + 0.05 * rng.normal(size=(n, 4)), 0.5 * rng.normal(size=(n, 4))], axis=1)
    return codes, factors


def test_an_axis_aligned_code_scores_high_and_its_rotation_far_lower():
    codes, factors = synthetic()
    aligned = dci(codes, factors)
    assert min(aligned["disentanglement"], aligned["completeness"], aligned["informativeness"]) >= 0.8
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))  # a random rotation of the code
    rotated = dci(codes @ q, factors)
    assert rotated["informativeness"] >= 0.8  # the information is all still there (linear)...
    assert rotated["disentanglement"] < aligned["disentanglement"] - 0.4  # ...but spread over the dimensions
    assert rotated["completeness"] < aligned["completeness"] - 0.4


def test_scores_agree_with_an_independent_numpy_computation():
    codes, factors = synthetic(seed=2)
    out = dci(codes, factors, alpha=1e-6, seed=3)
    R = out["importance"]
    # D and C, written again from the definitions
    p_code = R / R.sum(1, keepdims=True)
    h_code = np.array([-sum(v * np.log(v) / np.log(R.shape[1]) for v in row if v > 0) for row in p_code])
    d = ((1 - h_code) * R.sum(1) / R.sum()).sum()
    p_factor = R / R.sum(0, keepdims=True)
    h_factor = np.array([-sum(v * np.log(v) / np.log(R.shape[0]) for v in col if v > 0) for col in p_factor.T])
    c = ((1 - h_factor) * R.sum(0) / R.sum()).sum()
    assert out["disentanglement"] == pytest.approx(d, abs=1e-12) and out["completeness"] == pytest.approx(c, abs=1e-12)
    # with a vanishing penalty the lasso is least squares: importances and R^2 from numpy's lstsq
    order = np.random.default_rng(3).permutation(len(codes))
    test, train = order[:150], order[150:]
    standard = [(a - a[train].mean(0)) / a[train].std(0) for a in (codes, factors)]
    x, y = standard
    design = np.c_[x[train], np.ones(len(train))]
    coef = np.linalg.lstsq(design, y[train], rcond=None)[0]
    np.testing.assert_allclose(R, np.abs(coef[:-1]), atol=1e-4)
    pred = np.c_[x[test], np.ones(len(test))] @ coef
    r2 = 1 - ((pred - y[test]) ** 2).sum(0) / ((y[test] - y[test].mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(out["r2"], r2, atol=1e-5)
    assert out["informativeness"] == pytest.approx(np.clip(r2, 0, 1).mean(), abs=1e-5)
    # the two extremes of the definition
    assert disentanglement_completeness(np.eye(3))[:2] == (pytest.approx(1.0), pytest.approx(1.0))
    assert disentanglement_completeness(np.ones((3, 3)))[:2] == (pytest.approx(0.0), pytest.approx(0.0))


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """An invert output (W+ and S) of 16 generator samples, and the pictures' mean brightness and contrast."""
    import torch
    from PIL import Image

    from models.default_generator import load_default_generator
    from ops.images import to_uint8
    from pipelines.cli import main

    root = tmp_path_factory.mktemp("dci")
    G = load_default_generator()
    (root / "in").mkdir()
    with torch.no_grad():
        images = to_uint8(G.synthesis(G.mapping(torch.randn(16, G.style_dim,
                                                            generator=torch.Generator().manual_seed(9)))))
    rows = ["key,brightness,contrast"]
    for i, a in enumerate(images):
        Image.fromarray(a).save(root / "in" / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{a.mean():.4f},{a.std():.4f}")
    (root / "attributes.csv").write_text("\n".join(rows) + "\n")
    assert main(["invert", "--input", str(root / "in"), "--output", str(root / "latents"), "--spaces",
                 "wplus,s", "--steps", "2", "--align", "none", "--lpips-net", "alex",
                 "--lpips-backbone", "random"]) == 0
    return root, G


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """An import output of 40 W+ codes, each layer its own mapped w (so no two code axes are copies)."""
    import torch

    from models.default_generator import load_default_generator
    from pipelines.cli import main

    root = tmp_path_factory.mktemp("dci_imported")
    G = load_default_generator()
    with torch.no_grad():
        z = torch.randn(40 * G.n_latent, G.style_dim, generator=torch.Generator().manual_seed(21))
        torch.save(G.mapping(z).reshape(40, G.n_latent, G.style_dim).clone(), root / "latents.pt")
    assert main(["import", "--input", str(root / "latents.pt"), "--output", str(root / "latents")]) == 0
    return root, G


def stored(root, column):
    """key -> flattened stored value of `column`, from the latents output under `root`."""
    from conftest import read_parts
    from pipelines.io import tensor

    table = read_parts(root / "latents")
    values = tensor(table, column) if column in ("wplus", "styles") else np.asarray(table.column(column))
    return {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in zip(table.column("key").to_pylist(), values)}


def test_the_dci_stage_scores_every_space_of_an_invert_output(latents):
    """An invert output's W+ and S against attributes the image determines (per-image mean brightness and
    contrast); S comes from the stored column, one row per space; factors joined by key."""
    from pipelines.cli import main

    tmp_path, G = latents
    assert main(["dci", "--input", str(tmp_path / "latents"), "--output", str(tmp_path / "dci"), "--attributes",
                 str(tmp_path / "attributes.csv"), "--spaces", "wplus,s", "--alpha", "0.05"]) == 0
    table = pq.read_table(tmp_path / "dci" / "dci.parquet").to_pydict()
    assert table["space"] == ["wplus", "s"] and table["dims"] == [G.n_latent * G.style_dim, G.n_styles]
    assert all(0 <= v <= 1 for m in ("disentanglement", "completeness", "informativeness") for v in table[m])
    importance = pq.read_table(tmp_path / "dci" / "importance_s.parquet").to_pydict()
    assert set(importance) == {"dim", "brightness", "contrast"} and len(importance["dim"]) == G.n_styles
    assert (tmp_path / "dci" / "previews" / "dci_s.png").exists()
    stats = json.loads((tmp_path / "dci" / "stats.json").read_text())
    assert stats["rows"] == 16 and stats["factors"] == ["brightness", "contrast"]
    page = (tmp_path / "dci" / "report.html").read_text()  # the scores and the importance matrix, on its page
    assert "<h2>dci.parquet</h2>" in page and "previews/dci_s.png" in page and f'data-v="{table["dims"][1]}"' in page
    assert main(["dci", "--input", str(tmp_path / "latents"), "--output", str(tmp_path / "dci_w"),
                 "--attributes", str(tmp_path / "attributes.csv"), "--spaces", "w"]) == 2  # no w column stored


@pytest.mark.parametrize("regressor", ["lasso", "gbt"])
def test_a_planted_factor_is_found_on_its_axis_whatever_the_attribute_files_row_order(imported, regressor):
    """A factor that is one W+ axis of each key's stored code (plus one pure-noise factor), written to the attribute
    file in shuffled row order: the stage finds that axis as the factor's most important dimension and predicts it
    (a join by row order instead of by key would not), and its scores equal `ops.dci.dci` on codes and factors
    joined by key here, in sorted-key order."""
    from ops.dci import dci
    from pipelines.cli import main

    root, G = imported
    styles = stored(root, "wplus")
    axis = 3 * G.style_dim + 7
    rng = np.random.default_rng(5)
    keys = list(styles)
    rng.shuffle(keys)
    noise = {k: rng.normal() for k in keys}
    lines = ["key,planted,noise"] + [f"{k},{float(styles[k][axis])!r},{float(noise[k])!r}" for k in keys]
    (root / f"planted_{regressor}.csv").write_text("\n".join(lines) + "\n")
    out = root / f"dci_{regressor}"
    assert main(["dci", "--input", str(root / "latents"), "--output", str(out), "--attributes",
                 str(root / f"planted_{regressor}.csv"), "--spaces", "wplus", "--regressor", regressor]) == 0
    importance = pq.read_table(out / "importance_wplus.parquet").to_pydict()
    assert int(np.argmax(importance["planted"])) == axis
    scores = pq.read_table(out / "dci.parquet").to_pydict()
    ordered = sorted(styles)
    expected = dci(np.stack([styles[k] for k in ordered]), np.array([[styles[k][axis], noise[k]] for k in ordered]),
                   regressor=regressor, alpha=0.01)
    assert expected["r2"][0] > 0.5  # the planted factor is predicted from the codes (the noise one is not)
    for m in ("disentanglement", "completeness", "informativeness"):
        assert scores[m][0] == pytest.approx(expected[m], rel=1e-6, abs=1e-9), m
    np.testing.assert_allclose(importance["planted"], expected["importance"][:, 0], rtol=1e-6, atol=1e-9)


def test_factors_can_be_columns_of_the_input_itself(latents):
    """`--attribute-columns` takes the factors from the input's own columns (here the stored W+ PSNR and MSE), with
    no attribute file: the scores equal `ops.dci.dci` on the stored codes and those columns."""
    from ops.dci import dci
    from pipelines.cli import main

    root, _ = latents
    out = root / "dci_own"
    assert main(["dci", "--input", str(root / "latents"), "--output", str(out), "--attribute-columns",
                 "wplus_psnr,wplus_mse", "--spaces", "wplus"]) == 0
    wplus, psnr, mse = stored(root, "wplus"), stored(root, "wplus_psnr"), stored(root, "wplus_mse")
    ordered = sorted(wplus)
    expected = dci(np.stack([wplus[k] for k in ordered]), np.array([[psnr[k][0], mse[k][0]] for k in ordered]))
    scores = pq.read_table(out / "dci.parquet").to_pydict()
    assert json.loads((out / "stats.json").read_text())["factors"] == ["wplus_psnr", "wplus_mse"]
    for m in ("disentanglement", "completeness", "informativeness"):
        assert scores[m][0] == pytest.approx(expected[m], rel=1e-6, abs=1e-9), m

"""End to end on local Ray: the bad-input corpus and generator samples through `latentray invert`."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from corpus import bad_input_corpus
from models.default_generator import load_default_generator
from ops.images import to_uint8
from pipelines.cli import main

ARGS = ["--spaces", "wplus,fwplus", "--base-level", "8", "--steps", "3", "--batch-size", "4",
        "--lpips-net", "alex", "--lpips-backbone", "random"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name, (data, _, _) in bad_input_corpus().items():
        (root / name).write_bytes(data)
    G = load_default_generator()
    with torch.no_grad():
        img = G.synthesis(G.mapping(torch.randn(3, G.style_dim, generator=torch.Generator().manual_seed(0))))
    (root / "gen").mkdir()
    for i, a in enumerate(to_uint8(img)):
        Image.fromarray(a).save(root / "gen" / f"{i}.png")
    return root


def read_all(out):
    return pq.read_table([str(p) for p in sorted(out.glob("part-*.parquet"))])


def test_invert_accounts_for_every_input_once_and_resumes(photo_dir, tmp_path):
    out = tmp_path / "latents"
    assert main(["invert", "--input", str(photo_dir), "--output", str(out), *ARGS]) == 0
    table = read_all(out)
    keys = table.column("key").to_pylist()
    expected = bad_input_corpus()
    assert sorted(keys) == sorted([*expected, "gen/0.png", "gen/1.png", "gen/2.png"])
    status = dict(zip(keys, table.column("status").to_pylist()))
    codes = dict(zip(keys, table.column("error_code").to_pylist()))
    for name, (_, st, code) in expected.items():
        assert (status[name], codes[name]) == (st, code), name
    wplus = table.column("wplus").combine_chunks().to_numpy_ndarray()
    ok = np.array([s == "ok" for s in status.values()])
    assert wplus.shape == (len(keys), 10, 128) and wplus.dtype == np.float32
    assert np.isfinite(wplus[ok]).all() and np.isnan(wplus[~ok]).all()
    assert table.column("fwplus_base_code").combine_chunks().to_numpy_ndarray().shape[1:] == (128, 8, 8)
    assert set(table.column("lpips_backbone").to_pylist()) == {"random"}
    assert b"latentray" in table.schema.metadata
    # the stored latents reproduce the stored metrics (rendered back with plain pyarrow columns)
    from ops import metrics
    from ops.render import render

    gen = [i for i, k in enumerate(keys) if k.startswith("gen/")]
    G = load_default_generator()
    targets = torch.stack([torch.from_numpy(np.asarray(Image.open(photo_dir / keys[i]))) for i in gen])
    targets = targets.permute(0, 3, 1, 2).float() / 127.5 - 1
    base = table.column("fwplus_base_code").combine_chunks().to_numpy_ndarray()[gen]
    fw = table.column("fwplus_wplus").combine_chunks().to_numpy_ndarray()[gen]
    rendered = render(G, {"fwplus_base_code": base, "fwplus_wplus": fw}, "fwplus", base_level=8)
    stored = table.column("fwplus_psnr").to_numpy()[gen]
    np.testing.assert_allclose(metrics.psnr(rendered, targets).numpy(), stored, atol=1e-3)
    rendered = render(G, {"wplus": table.column("wplus").combine_chunks().to_numpy_ndarray()[gen]}, "wplus")
    np.testing.assert_allclose(metrics.psnr(rendered, targets).numpy(), table.column("wplus_psnr").to_numpy()[gen],
                               atol=1e-3)
    # export for other tools: only ok rows
    assert main(["export", "--input", str(out), "--output", str(tmp_path / "w.npz")]) == 0
    exported = np.load(tmp_path / "w.npz")
    assert list(exported["keys"]) == [k for k, s in zip(keys, status.values()) if s == "ok"]
    np.testing.assert_array_equal(exported["w"], wplus[ok])
    assert main(["export", "--input", str(out), "--output", str(tmp_path / "w.pt")]) == 0
    assert set(torch.load(tmp_path / "w.pt", weights_only=True)) == set(exported["keys"])
    # rerun: nothing left to do
    assert main(["invert", "--input", str(photo_dir), "--output", str(out), *ARGS]) == 0
    assert sorted(read_all(out).column("key").to_pylist()) == sorted(keys)
    assert json.loads((out / "stats.json").read_text())["rows_processed"] == 0
    # a different configuration refuses to resume
    assert main(["invert", "--input", str(photo_dir), "--output", str(out), *ARGS[:-2], "--lpips-backbone",
                 "random", "--seed", "1"]) == 2


def test_limit_marks_the_rest_skipped(photo_dir, tmp_path):
    out = tmp_path / "limited"
    assert main(["invert", "--input", str(photo_dir / "gen"), "--output", str(out), "--limit", "1", *ARGS]) == 0
    table = read_all(out)
    assert sorted(zip(table.column("key").to_pylist(), table.column("status").to_pylist())) == \
        [("0.png", "ok"), ("1.png", "skipped"), ("2.png", "skipped")]

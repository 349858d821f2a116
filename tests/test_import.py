"""`latentray import`: other tools' latent files become rows that render as the source tool's latent does, that
downstream stages read like invert outputs, and that are checked against the generator before any row."""

import numpy as np
import torch

from conftest import read_parts, tensor
from ops.latents import render
from pipelines.cli import main


def mapped(G, n, seed):
    with torch.no_grad():
        return G.mapping(torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed)))


def rows_by_key(out):
    table = read_parts(out)
    return dict(zip(table.column("key").to_pylist(), tensor(table, "wplus"))), table


def test_every_format_imports_and_renders_as_its_tool_would(G, tmp_path):
    w = mapped(G, 3, 0)
    wplus = G.to_wplus(w).clone() + 0.05 * torch.randn(3, G.n_latent, G.style_dim,
                                                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        images = G.synthesis(wplus)
    files = {}
    # rosinality projector.py (--w_plus): {input path: {"img", "latent", "noise"}}
    files["rosinality.pt"] = {f"photos/{i}.png": {"img": images[i], "latent": wplus[i],
                                                  "noise": G.make_noise(1)} for i in range(3)}
    torch.save(files["rosinality.pt"], tmp_path / "rosinality.pt")
    # NVIDIA projector.py: <outdir>/projected_w.npz, w [1, num_ws, 512]
    (tmp_path / "target7").mkdir()
    np.savez(tmp_path / "target7" / "projected_w.npz", w=wplus[:1].numpy())
    # e4e/pSp inference.py: latents.pt, a bare [N, L, D] tensor; names from a list
    torch.save(wplus, tmp_path / "latents.pt")
    (tmp_path / "names.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    # plain w vectors
    np.save(tmp_path / "w.npy", w.numpy())
    runs = {"rosinality.pt": [], "target7/projected_w.npz": [], "latents.pt": ["--keys", str(tmp_path / "names.txt")],
            "w.npy": []}
    for name, extra in runs.items():
        assert main(["import", "--input", str(tmp_path / name), "--output", str(tmp_path / f"out-{name[:4]}"),
                     *extra]) == 0, name
    ros, table = rows_by_key(tmp_path / "out-rosi")
    assert sorted(ros) == ["photos/0.png", "photos/1.png", "photos/2.png"]
    assert set(table.column("status").to_pylist()) == {"ok"}
    rendered = render(G, {"wplus": np.stack([ros[f"photos/{i}.png"] for i in range(3)])}, "wplus")
    assert torch.equal(rendered, images)  # the very image of the tool's latent (constant noise)
    nv, _ = rows_by_key(tmp_path / "out-targ")
    assert list(nv) == ["target7"] and np.array_equal(nv["target7"], wplus[0].numpy())
    e4e, _ = rows_by_key(tmp_path / "out-late")
    assert np.array_equal(np.stack([e4e[k] for k in ("a.jpg", "b.jpg", "c.jpg")]), wplus.numpy())
    plain, _ = rows_by_key(tmp_path / "out-w.np")
    assert sorted(plain) == ["000000", "000001", "000002"]
    assert np.array_equal(plain["000001"], G.to_wplus(w)[1].numpy())  # a w broadcast to every W+ row


def test_imported_latents_feed_the_latent_stages(G, tmp_path):
    """An import output is read like an invert output: an edit of it renders the moved latent."""
    torch.save(G.to_wplus(mapped(G, 2, 3)).clone(), tmp_path / "latents.pt")
    assert main(["import", "--input", str(tmp_path / "latents.pt"), "--output", str(tmp_path / "imported")]) == 0
    np.save(tmp_path / "d.npy", np.ones(G.style_dim, np.float32))
    (tmp_path / "edits.yaml").write_text(f"- {{kind: direction, path: {tmp_path / 'd.npy'}, strengths: [0, 1]}}\n")
    assert main(["edit", "--input", str(tmp_path / "imported"), "--output", str(tmp_path / "edits"), "--edits",
                 str(tmp_path / "edits.yaml")]) == 0
    source, _ = rows_by_key(tmp_path / "imported")
    edited, _ = rows_by_key(tmp_path / "edits")
    assert np.array_equal(edited["000000|direction|0"], source["000000"])
    np.testing.assert_allclose(edited["000001|direction|1"], source["000001"] + 1, atol=1e-6)


def test_misfit_and_unsafe_files_are_refused_before_any_row(G, tmp_path, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((2, 512), np.float32))
    assert main(["import", "--input", str(tmp_path / "wrong.npy"), "--output", str(tmp_path / "o1")]) == 2
    assert "do not fit this generator" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["import", "--input", str(tmp_path / "objects.npy"), "--output", str(tmp_path / "o2")]) == 2
    torch.save({"latent": torch.zeros(3), "payload": __import__("os").system}, tmp_path / "evil.pt")
    assert main(["import", "--input", str(tmp_path / "evil.pt"), "--output", str(tmp_path / "o3")]) == 2
    torch.save(torch.zeros(2, G.n_latent, G.style_dim), tmp_path / "two.pt")
    (tmp_path / "one.txt").write_text("only\n")
    assert main(["import", "--input", str(tmp_path / "two.pt"), "--keys", str(tmp_path / "one.txt"), "--output",
                 str(tmp_path / "o4")]) == 2
    assert "2 latents but 1 keys" in capsys.readouterr().err

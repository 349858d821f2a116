"""LPIPS wrapper against the lpips goldens, offline refusal, fetch-weights, and the regularisers against independent
references."""

import functools
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
import torch

from conftest import load_cases
from models.default_generator import load_default_generator
from models.perceptual import Perceptual, PerceptualWeightsMissing, box_downsample
from ops.regularizers import compute_p_space_stats, noise_regularizer, normalize_noise_, pnorm_penalty
from pipelines.cli import main


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_random_backbone_lpips_matches_goldens(net):
    c = load_cases("lpips", "lpips_random_backbone_cases.pt")
    P = Perceptual(net, backbone="random")
    assert P.backbone == "random"
    with torch.no_grad():
        np.testing.assert_allclose(P(c["x0"], c["x1"]), c[f"{net}_d"].reshape(-1), atol=1e-6)
        np.testing.assert_allclose(P(c["y0"], c["y1"]), c[f"{net}_d_nonsquare"].reshape(-1), atol=1e-6)


def test_missing_imagenet_backbone_is_refused_with_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PerceptualWeightsMissing, match=r"vgg16-397923af\.pth in .*hub/checkpoints"):
        Perceptual("vgg")


def torchvision_file(folder, net: str, seed: int = 1):
    """A torchvision-layout state dict of `net` (seeded random weights), saved under the name torchvision would give
    it: `<name>-<sha256[:8]>.pth`. Returns (path, state)."""
    import hashlib
    import io as bytes_io

    import torchvision

    torch.manual_seed(seed)
    state = getattr(torchvision.models, {"alex": "alexnet", "vgg": "vgg16"}[net])(weights=None).state_dict()
    buffer = bytes_io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = folder / f"{net}-test-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    return path, state


def test_the_imagenet_backbone_is_read_with_weights_only_into_the_trunk(tmp_path, monkeypatch):
    """Our own read of the torchvision file fills the LPIPS trunk layer for layer (torchvision's loader, which
    unpickles with code execution allowed, is never used), and run.json gets the file's whole sha256."""
    from models import perceptual

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    path, state = torchvision_file(folder, "alex")
    monkeypatch.setitem(perceptual.BACKBONE_FILES, "alex", path.name)
    p = Perceptual("alex", "imagenet")
    trunk = p.lpips.net.state_dict()
    assert len(trunk) == 10 and all(torch.equal(v, state[f"features.{k.split('.', 1)[1]}"]) for k, v in trunk.items())
    assert p.backbone_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    random = Perceptual("alex", "random").lpips.net.state_dict()
    assert not torch.equal(random["slice1.0.weight"], trunk["slice1.0.weight"])


def test_an_armed_pickle_in_the_torch_hub_cache_is_refused_and_never_runs(tmp_path, monkeypatch):
    """A file placed at the exact cache path (by hand, a shared cache, a hostile mirror) carrying code: refused with
    a clear error by the hash in its name; and with a matching name, by weights_only. The payload never runs."""
    import pickle

    from models import perceptual
    from models.checkpoints import CheckpointError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    marker = tmp_path / "payload-ran"

    class Armed:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    armed = pickle.dumps({"features.0.weight": Armed()}, protocol=2)  # as torch.save writes them
    (folder / perceptual.BACKBONE_FILES["vgg"]).write_bytes(armed)
    with pytest.raises(CheckpointError, match=r"vgg16-397923af\.pth: its sha256 .* does not start with the hash"):
        Perceptual("vgg", "imagenet")
    named = folder / f"vgg16-{hashlib.sha256(armed).hexdigest()[:8]}.pth"  # a forged name: the hash matches
    named.write_bytes(armed)
    monkeypatch.setitem(perceptual.BACKBONE_FILES, "vgg", named.name)
    with pytest.raises(CheckpointError, match="refused to load"):
        Perceptual("vgg", "imagenet")
    assert not marker.exists()
    pickle.loads(armed)  # control: the same bytes under a naive loader do run the payload
    assert marker.exists()


def test_box_downsample_is_a_block_mean():
    x = torch.randn(2, 3, 512, 512)
    y = box_downsample(x)
    assert y.shape == (2, 3, 256, 256)
    assert torch.allclose(y[0, 1, 3, 5], x[0, 1, 6:8, 10:12].mean())
    small = torch.randn(1, 3, 64, 64)
    assert box_downsample(small) is small


def test_pnorm_penalty_is_one_on_the_generators_own_samples_and_large_elsewhere():
    G = load_default_generator()
    stats = compute_p_space_stats(G, n=20_000, seed=1)
    assert torch.all(stats.eigvals[:-1] >= stats.eigvals[1:])
    z = torch.randn(2000, G.style_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        own = pnorm_penalty(G.mapping(z).reshape(200, 10, -1), stats)
    assert abs(own.mean().item() - 1.0) < 0.1
    arbitrary = pnorm_penalty(torch.randn(200, 10, G.style_dim, generator=torch.Generator().manual_seed(8)), stats)
    assert arbitrary.min() > 20 * own.mean()


def test_p_space_stats_match_numpy():
    G = load_default_generator()
    stats = compute_p_space_stats(G, n=3000, seed=2, batch=1000)
    z = torch.randn(3000, G.style_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w = G.mapping(z).double().numpy()
    x = np.where(w >= 0, w, 5.0 * w)
    np.testing.assert_allclose(stats.mean, x.mean(0), atol=1e-5)
    cov = np.cov(x, rowvar=False)
    recon = stats.eigvecs.double().numpy() @ np.diag(stats.eigvals.double().numpy()) @ stats.eigvecs.double().numpy().T
    np.testing.assert_allclose(recon, cov, atol=1e-4 * np.abs(cov).max())


def numpy_noise_penalty(maps):
    total = 0.0
    for n in maps:
        while True:
            total += np.mean(n * np.roll(n, 1, axis=1)) ** 2 + np.mean(n * np.roll(n, 1, axis=0)) ** 2
            if n.shape[0] <= 8:
                break
            n = n.reshape(n.shape[0] // 2, 2, n.shape[1] // 2, 2).mean(axis=(1, 3))
    return total


def test_noise_regularizer_is_per_image_and_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    noises = [torch.randn(3, 1, r, r, generator=gen) for r in (4, 8, 16, 32)]
    noises[1][2] += torch.linspace(0, 1, 8)  # a correlated map for image 2 only
    got = noise_regularizer(noises)
    for b in range(3):
        assert got[b].item() == pytest.approx(numpy_noise_penalty([n[b, 0].numpy() for n in noises]), rel=1e-5)
    normalize_noise_(noises)
    for n in noises:
        assert torch.allclose(n.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-6)
        assert torch.allclose(n.std(dim=(1, 2, 3)), torch.ones(3), atol=1e-5)


# ----- fetch-weights -----------------------------------------------------------------------------------------------
@pytest.fixture()
def weight_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_weights_downloads_checks_the_hash_and_fails_clearly_offline(weight_server, tmp_path, monkeypatch,
                                                                           capsys):
    served, url = weight_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = os.urandom(1000)
    good = f"tiny-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (served / good).write_bytes(data)
    (served / "bad-00000000.pth").write_bytes(data)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert main(["fetch-weights", good, "--base-url", url]) == 0
    assert (cache / good).read_bytes() == data
    assert main(["fetch-weights", "bad-00000000.pth", "--base-url", url]) == 2  # hash prefix does not match
    assert not (cache / "bad-00000000.pth").exists()
    capsys.readouterr()
    assert main(["fetch-weights", "vgg", "--base-url", "http://127.0.0.1:9/"]) == 2  # nothing listens: offline
    err = capsys.readouterr().err
    assert "vgg16-397923af.pth" in err and str(cache) in err

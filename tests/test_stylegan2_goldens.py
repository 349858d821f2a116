"""Our Generator against the golden outputs of the official rosinality and NVIDIA code (reference/stylegan2)."""

import contextlib

import pytest
import torch

from conftest import key_listing, load_cases, reference_file
from models.checkpoints import load_generator

IMG_TOL, MAP_TOL = 1e-4, 1e-5


def close(actual, expected, tol):
    err = (actual - expected).abs().max().item()
    assert actual.shape == expected.shape and err <= tol, f"max |diff| {err:.3g} > {tol} (shape {tuple(actual.shape)})"


@contextlib.contextmanager
def capture_outputs(G, names):
    """Record the forward output of the named submodules."""
    out, handles = {}, []
    for name in names:
        module = G.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o.detach())))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


# ----- rosinality ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ros():
    G = load_generator(str(reference_file("stylegan2", "rosinality_small.pt")))
    return G, load_cases("stylegan2", "rosinality_small_cases.pt")


def ros_noise(c):
    return [c[f"noise_{i}"] for i in range(7)]


def test_rosinality_mapping_and_mean_latent(ros):
    G, c = ros
    with torch.no_grad():
        close(G.mapping(c["z"]), c["w"], MAP_TOL)
        close(G.mapping(c["z2"]), c["w2"], MAP_TOL)
        close(G.mapping(c["wplus_z"].reshape(-1, 64)).reshape(4, 8, 64), c["wplus"], MAP_TOL)
        close(G.mean_latent(4096, seed=4096), c["mean_latent"], MAP_TOL)
    close(G.w_avg[None], c["mean_latent"], 0)  # the checkpoint's latent_avg


@pytest.mark.parametrize("case,psi", [("a_z_trunc1", 1.0), ("b_z_trunc0.7", 0.7)])
def test_rosinality_w_synthesis_and_truncation(ros, case, psi):
    G, c = ros
    with torch.no_grad():
        w = G.mapping(c["z"])
        if psi < 1:
            w = G.truncate(w, c["mean_latent"], psi)
        close(G.to_wplus(w), c[f"latent_{case[0]}"], MAP_TOL)
        close(G.synthesis(w, noise=ros_noise(c)), c[f"img_{case}"], IMG_TOL)


def test_rosinality_wplus_and_style_mixing(ros):
    G, c = ros
    with torch.no_grad():
        close(G.synthesis(c["wplus"], noise=ros_noise(c)), c["img_c_wplus"], IMG_TOL)
        w, w2 = G.to_wplus(G.mapping(c["z"])), G.to_wplus(G.mapping(c["z2"]))
        mixed = torch.cat([w[:, :3], w2[:, 3:]], dim=1)
        close(mixed, c["latent_mix_inject3"], MAP_TOL)
        close(G.synthesis(mixed, noise=ros_noise(c)), c["img_mix_inject3"], IMG_TOL)


@pytest.mark.parametrize("which,latent", [("S_a", "latent_a"), ("S_c", "wplus")])
def test_rosinality_stylespace(ros, which, latent):
    G, c = ros
    with torch.no_grad():
        styles = G.styles(c[latent])
        assert list(styles) == ["conv1", "to_rgb1", "convs.0", "convs.1", "to_rgbs.0", "convs.2", "convs.3",
                                "to_rgbs.1", "convs.4", "convs.5", "to_rgbs.2"]
        for name, s in styles.items():
            close(s, c[f"{which}.{name}"], MAP_TOL)
        close(G.styles_to_vector(styles), c[f"{which}_concat"], MAP_TOL)
        # synthesis from the golden S (not ours) reproduces the golden image
        golden_s = {name: c[f"{which}.{name}"] for name in styles}
        img = c["img_a_z_trunc1"] if which == "S_a" else c["img_c_wplus"]
        close(G.synthesis_from_styles(golden_s, noise=ros_noise(c)), img, IMG_TOL)
        close(G.synthesis_from_styles(c[f"{which}_concat"], noise=ros_noise(c)), img, IMG_TOL)


def test_rosinality_layer_features_and_rgb_skip(ros):
    G, c = ros
    convs = ["conv1"] + [f"convs.{j}" for j in range(6)]
    rgbs = ["to_rgb1"] + [f"to_rgbs.{k}" for k in range(3)]
    with torch.no_grad(), capture_outputs(G, convs + rgbs) as out:
        G.synthesis(c["latent_a"], noise=ros_noise(c))
    for layer, name in enumerate(convs):
        close(out[name], c[f"feat_a.L{layer}"], IMG_TOL)
    for name in rgbs:
        close(out[name], c[f"rgb_a.{name}"], IMG_TOL)


@pytest.mark.parametrize("level", [8, 16])
def test_rosinality_bdinvert_base_code(ros, level):
    G, c = ros
    key = f"F_bdinvert_{level}"
    with torch.no_grad():
        close(G.base_code(c["latent_a"], level, noise=ros_noise(c)), c[f"{key}.feat"], IMG_TOL)
        close(G.synthesis_from_base_code(c[f"{key}.feat"], c["latent_a"], level, noise=ros_noise(c)),
              c[f"{key}.img"], IMG_TOL)
        # F and W+ as independent variables: a perturbed F with another W+
        close(G.synthesis_from_base_code(c[f"{key}.feat_perturbed"], c["wplus"], level, noise=ros_noise(c)),
              c[f"{key}.img_perturbed_wplus"], IMG_TOL)


def test_rosinality_noise_modes(ros):
    G, c = ros
    w = G.mapping(c["z"])
    with torch.no_grad():
        for i in range(7):
            close(getattr(G.noises, f"noise_{i}"), c[f"noise_buffer_{i}"], 0)
        close(G.synthesis(w), c["img_noise_buffers"], IMG_TOL)  # "const" is the default
        close(G.synthesis(w, noise="zero"), c["img_noise_zero"], IMG_TOL)
        gen = torch.Generator().manual_seed(1234)
        close(G.synthesis(w, noise="random", generator=gen), c["img_noise_random_seed1234"], IMG_TOL)
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        G.synthesis(w, noise="random")


def test_rosinality_gradient_wrt_wplus(ros):
    G, c = ros
    wplus = c["wplus"].clone().requires_grad_(True)
    loss = (G.synthesis(wplus, noise=ros_noise(c)) * c["grad_R"]).sum()
    loss.backward()
    close(loss.detach(), c["grad_loss"], 1e-3)
    close(wplus.grad, c["grad_wplus_of_sum_img_times_R"], IMG_TOL)


# ----- NVIDIA --------------------------------------------------------------------------------------------------------
NV_ORDER = ["b4.conv1", "b4.torgb", "b8.conv0", "b8.conv1", "b8.torgb", "b16.conv0", "b16.conv1", "b16.torgb",
            "b32.conv0", "b32.conv1", "b32.torgb"]


def nv_to_ours(layer: str) -> str:
    """NVIDIA layer name -> our module name, from README §5 (written independently of the loader)."""
    res, kind = layer.split(".")
    k = {"b4": 2, "b8": 3, "b16": 4, "b32": 5}[res]
    if kind == "torgb":
        return "to_rgb1" if k == 2 else f"to_rgbs.{k - 3}"
    return "conv1" if k == 2 else f"convs.{2 * k - 6 + (kind == 'conv1')}"


@pytest.fixture(scope="module")
def nv():
    G = load_generator(str(reference_file("stylegan2", "nvidia_ada_small.pkl")))
    return G, load_cases("stylegan2", "nvidia_ada_small_cases.pt")


def test_nvidia_mapping_truncation_and_w_avg(nv):
    G, c = nv
    assert G.source_format == "nvidia"
    close(G.w_avg, c["w_avg"], 0)
    with torch.no_grad():
        w = G.mapping(c["z"])
        close(G.to_wplus(w), c["ws"], MAP_TOL)
        close(G.to_wplus(G.truncate(w, G.w_avg, 0.7)), c["ws_psi0.7"], MAP_TOL)


def test_nvidia_images_all_noise_modes(nv):
    G, c = nv
    with torch.no_grad():
        w = G.mapping(c["z"])
        close(G.synthesis(w), c["img_psi1_const"], IMG_TOL)
        close(G.synthesis(G.truncate(w, G.w_avg, 0.7)), c["img_psi0.7_const"], IMG_TOL)
        close(G.synthesis(c["wsplus"]), c["img_wsplus_const"], IMG_TOL)
        close(G.synthesis(w, noise="zero"), c["img_psi1_none"], IMG_TOL)
        gen = torch.Generator().manual_seed(1234)
        close(G.synthesis(w, noise="random", generator=gen), c["img_psi1_random_seed1234"], IMG_TOL)
    for layer in [n for n in NV_ORDER if "torgb" not in n]:
        i = 0 if layer == "b4.conv1" else int(nv_to_ours(layer).split(".")[1]) + 1
        close(getattr(G.noises, f"noise_{i}")[0, 0], c[f"buffer.synthesis.{layer}.noise_const"], 0)


@pytest.mark.parametrize("suffix,latent", [("psi1", "ws"), ("wsplus", "wsplus")])
def test_nvidia_stylespace(nv, suffix, latent):
    G, c = nv
    with torch.no_grad():
        styles = G.styles(c[latent])
        assert list(styles) == [nv_to_ours(n) for n in NV_ORDER]
        for layer in NV_ORDER:
            close(styles[nv_to_ours(layer)], c[f"styles.synthesis.{layer}.{suffix}"], MAP_TOL)
        if suffix == "psi1":
            close(G.styles_to_vector(styles), c["styles_concat.psi1"], MAP_TOL)
            close(G.synthesis_from_styles(c["styles_concat.psi1"]), c["img_psi1_const"], IMG_TOL)


def test_nvidia_layer_and_block_outputs(nv):
    G, c = nv
    convs = [n for n in NV_ORDER if "torgb" not in n]
    rgbs = [n for n in NV_ORDER if "torgb" in n]
    with torch.no_grad(), capture_outputs(G, [nv_to_ours(n) for n in NV_ORDER]) as out:
        G.synthesis(c["ws"])
    for layer in convs:
        close(out[nv_to_ours(layer)], c[f"x.synthesis.{layer}.psi1"], IMG_TOL)
    for layer in rgbs:
        res = layer.split(".")[0]
        close(out[nv_to_ours(layer)], c[f"block_img.{res}.psi1"], IMG_TOL)
        close(out[nv_to_ours(f"{res}.conv1")], c[f"block_x.{res}.psi1"], IMG_TOL)


def test_nvidia_gradient_wrt_wplus(nv):
    G, c = nv
    wplus = c["wsplus"].clone().requires_grad_(True)
    loss = (G.synthesis(wplus) * c["grad_R"]).sum()
    loss.backward()
    close(loss.detach(), c["grad_loss"], 1e-3)
    close(wplus.grad, c["grad_wsplus_of_sum_img_times_R"], IMG_TOL)


def test_both_formats_give_the_same_generator(ros, nv):
    """The reference builds both small models with the same architecture, so the inferred constructor args agree."""
    assert ros[0].architecture() == nv[0].architecture()


# ----- key listings --------------------------------------------------------------------------------------------------
def read_key_listing(name):
    return {k: list(v) for k, v in key_listing("stylegan2", name).items()}


@pytest.mark.parametrize("size,listing", [(256, "rosinality_keys_256_config_f.txt"),
                                          (1024, "rosinality_keys_1024_config_f.txt")])
def test_config_f_key_listing_and_stylespace_size(size, listing):
    from models.stylegan2 import Generator

    G = Generator(size)
    ours = {k: list(v.shape) for k, v in G.state_dict().items()}
    assert ours == read_key_listing(listing)
    conv = sum(layer.width for layer in G.style_layers if not layer.is_torgb)
    rgb = sum(layer.width for layer in G.style_layers if layer.is_torgb)
    assert (conv, rgb) == ({256: (5760, 2944), 1024: (6048, 3040)}[size])
    assert G.n_styles == conv + rgb and G.n_latent == {256: 14, 1024: 18}[size]


def test_nvidia_1024_listing_maps_onto_every_rosinality_key():
    from models.checkpoints import nvidia_to_rosinality

    nv = {k: torch.empty(shape) for k, shape in read_key_listing("nvidia_keys_1024_ffhq.txt").items()}
    sd, w_avg = nvidia_to_rosinality(nv)
    ros = read_key_listing("rosinality_keys_1024_config_f.txt")
    constants = {k for k in ros if k.endswith("kernel")}
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v for k, v in ros.items() if k not in constants}
    assert w_avg is not None and list(w_avg.shape) == [512]

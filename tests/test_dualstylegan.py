"""DualStyleGAN against the official goldens: every case of small_cases.pt, the all-zero-weights identity with the
intrinsic generator, the exstyle code files of numpy 1 and 2, and refusal of anything else."""

import json

import numpy as np
import pytest
import torch

from conftest import key_listing, reference_file
from models.checkpoints import CheckpointError
from models.dualstylegan import load_dualstylegan, load_exstyle_codes

ATOL = 1e-4  # outputs reach about +-27 (README: compare with atol ~1e-4)


@pytest.fixture(scope="module")
def g():
    return load_dualstylegan(str(reference_file("dualstylegan/small_generator.pt")))


@pytest.fixture(scope="module")
def cases():
    return torch.load(reference_file("dualstylegan/small_cases.pt"), weights_only=True)


def run(g, code, ex, **kw):
    args = dict(input_is_latent=False, z_plus_latent=True, truncation=0.75, truncation_latent=0, use_res=True,
                randomize_noise=False)
    with torch.no_grad():
        return g([code], ex, **{**args, **kw})[0]


def test_every_weight_vector_case(g, cases):
    weights = json.loads(cases["weights_json"]) if isinstance(cases["weights_json"], str) else cases["weights_json"]
    for name, w in weights.items():
        out = run(g, cases["instyle_zplus"], cases["exstyle_wplus"], interp_weights=w)
        assert (out - cases[f"out_{name}"]).abs().max() <= ATOL, name


def test_other_official_call_modes(g, cases):
    w = json.loads(cases["weights_json"])["cli_default"]
    z, ex = cases["instyle_zplus"], cases["exstyle_wplus"]
    assert (run(g, z, ex, use_res=False, interp_weights=w) - cases["out_use_res_false"]).abs().max() <= ATOL
    assert (run(g, z, ex, fuse_index=4, interp_weights=w) - cases["out_cli_default_fuse_index_4"]).abs().max() <= ATOL
    assert (run(g, z, ex, truncation=1, interp_weights=w) -
            cases["out_cli_default_truncation_1"]).abs().max() <= ATOL
    out = run(g, cases["instyle_wplus_input"], ex, input_is_latent=True, truncation=1, interp_weights=w)
    assert (out - cases["out_wplus_input_cli_default"]).abs().max() <= ATOL
    out = run(g, cases["instyle_z"], ex, z_plus_latent=False, truncation=0.5, interp_weights=w)
    assert (out - cases["out_z_input_trunc05_cli_default"]).abs().max() <= ATOL
    # --preserve_color: extrinsic Z+ rows 7: replaced by the content's before mapping
    ex_z = cases["exstyle_zplus"].clone()
    ex_z[:, 7:] = z[:, 7:]
    with torch.no_grad():
        ex_w = g.generator.mapping(ex_z.reshape(-1, ex_z.shape[-1])).reshape(ex_z.shape)
    assert (run(g, z, ex_w, interp_weights=w) - cases["out_cli_default_preserve_color"]).abs().max() <= ATOL
    with torch.no_grad():
        mapped = g.generator.mapping(cases["exstyle_zplus"].reshape(-1, 64)).reshape(cases["exstyle_zplus"].shape)
    assert (mapped - ex).abs().max() <= 1e-5


def test_random_noise_is_the_official_default_and_seedable(g, cases):
    z, ex = cases["instyle_zplus"], cases["exstyle_wplus"]
    with torch.no_grad():
        a = g([z], ex, z_plus_latent=True, truncation=0.75, truncation_latent=0)[0]
        b = g([z], ex, z_plus_latent=True, truncation=0.75, truncation_latent=0)[0]
        c = g([z], ex, z_plus_latent=True, truncation=0.75, truncation_latent=0,
              generator=torch.Generator().manual_seed(7))[0]
        d = g([z], ex, z_plus_latent=True, truncation=0.75, truncation_latent=0,
              generator=torch.Generator().manual_seed(7))[0]
    assert not torch.equal(a, b) and torch.equal(c, d)


def test_all_zero_weights_are_the_intrinsic_generator(g, cases):
    zero = [0.0] * g.n_latent
    out = run(g, cases["instyle_zplus"], cases["exstyle_wplus"], interp_weights=zero)
    assert (out - cases["out_intrinsic_generator"]).abs().max() <= ATOL
    with torch.no_grad():
        wplus = 0.75 * g.generator.mapping(cases["instyle_zplus"].reshape(-1, 64)).reshape(2, -1, 64)
        plain = g.generator.synthesis(wplus)
    assert torch.equal(run(g, wplus, cases["exstyle_wplus"], input_is_latent=True, truncation=1,
                           interp_weights=zero), plain)


@pytest.mark.parametrize("name", ["small_exstyle_code.npy", "small_exstyle_code_numpy1_pickle.npy"])
def test_exstyle_code_files_load_without_pickle_execution(cases, name):
    codes = load_exstyle_codes(str(reference_file(f"dualstylegan/{name}")))
    assert len(codes) == 2
    stacked = torch.from_numpy(np.concatenate(list(codes.values())))
    assert (stacked - cases["exstyle_zplus"]).abs().max() == 0


def test_hostile_and_foreign_files_are_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("executed",))

    payload = np.empty((), dtype=object)
    payload[()] = {"x": Boom()}
    np.save(tmp_path / "evil.npy", payload, allow_pickle=True)
    with pytest.raises(CheckpointError, match="refused global builtins.print"):
        load_exstyle_codes(str(tmp_path / "evil.npy"))
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="dtype object"):
        load_exstyle_codes(str(tmp_path / "plain.npy"))
    with pytest.raises(CheckpointError, match="expected a DualStyleGAN"):
        load_dualstylegan(str(reference_file("cyclegan/small_net_G_A.pth")))


@pytest.mark.parametrize("keys_file", ["keys_dualstylegan_1024.txt", "keys_small_generator.txt"])
def test_key_listings_match_our_module(keys_file):
    from models.dualstylegan import DualStyleGAN
    from models.stylegan2 import Generator

    listed = key_listing(f"dualstylegan/{keys_file}")
    with torch.device("meta"):
        G = Generator(1024) if "1024" in keys_file else \
            Generator(64, 64, 8, channels={4: 32, 8: 32, 16: 24, 32: 16, 64: 8})
        ours = {k: tuple(v.shape) for k, v in DualStyleGAN(G).state_dict().items()}
    assert ours == listed

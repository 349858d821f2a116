"""Checkpoint loading: every supported format, our own format, and malicious files that must stay inert."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import load_cases, reference_file
from models.checkpoints import CheckpointError, load_generator, nvidia_to_rosinality, save_generator
from models.default_generator import DEFAULT_GENERATOR_PATH, build_default_generator, load_default_generator
from models.stylegan2 import Generator


def same_function(G1, G2, tol=1e-5):
    wplus = torch.randn(2, G1.n_latent, G1.style_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return (G1.synthesis(wplus) - G2.synthesis(wplus)).abs().max().item() <= tol


def test_trainpy_layout_with_namespace_args_loads_safely():
    G = load_generator(str(reference_file("stylegan2", "rosinality_small_trainpy_namespace.pt")))
    ref = load_generator(str(reference_file("stylegan2", "rosinality_small.pt")))
    assert G.source_format == "rosinality" and G.w_avg is None  # train.py checkpoints carry no latent_avg
    assert G.generator_id != ref.generator_id and len(G.generator_id) == 64
    assert same_function(G, ref, tol=0)


def test_converted_nvidia_model_reloads_in_our_format_without_pickle(tmp_path):
    nv = load_generator(str(reference_file("stylegan2", "nvidia_ada_small.pkl")))
    path = tmp_path / "converted.pt"
    save_generator(nv, str(path))
    ours = load_generator(str(path))
    assert ours.source_format == "latentray"
    assert ours.architecture() == nv.architecture() and torch.equal(ours.w_avg, nv.w_avg)
    c = load_cases("stylegan2", "nvidia_ada_small_cases.pt")
    with torch.no_grad():
        assert (ours.synthesis(c["wsplus"]) - c["img_wsplus_const"]).abs().max() <= 1e-4
    torch.load(path, weights_only=True)  # the file needs no allow-list at all


def test_nvidia_renaming_at_another_size_inverts_exactly():
    """Build NVIDIA names from a 128px model with the README's table (the inverse direction), rename back."""
    torch.manual_seed(0)
    G = Generator(128, style_dim=16, n_mlp=3, channels={4: 8, 8: 8, 16: 8, 32: 8, 64: 4, 128: 4})
    ours = G.state_dict()
    nv = {f"mapping.fc{i}.{p}": ours[f"style.{i + 1}.{p}"] for i in range(3) for p in ("weight", "bias")}
    nv["mapping.w_avg"] = torch.randn(16)
    nv["synthesis.b4.const"] = ours["input.input"][0]

    def layer(nv_prefix, name, noise_index=None, rgb=False):
        nv[f"{nv_prefix}.weight"] = ours[f"{name}.conv.weight"][0]
        nv[f"{nv_prefix}.affine.weight"] = ours[f"{name}.conv.modulation.weight"]
        nv[f"{nv_prefix}.affine.bias"] = ours[f"{name}.conv.modulation.bias"]
        nv[f"{nv_prefix}.resample_filter"] = torch.full((4, 4), 1 / 16)
        if rgb:
            nv[f"{nv_prefix}.bias"] = ours[f"{name}.bias"].reshape(3)
        else:
            nv[f"{nv_prefix}.bias"] = ours[f"{name}.activate.bias"]
            nv[f"{nv_prefix}.noise_strength"] = ours[f"{name}.noise.weight"].reshape(())
            nv[f"{nv_prefix}.noise_const"] = ours[f"noises.noise_{noise_index}"][0, 0]

    layer("synthesis.b4.conv1", "conv1", 0)
    layer("synthesis.b4.torgb", "to_rgb1", rgb=True)
    for k, res in enumerate([8, 16, 32, 64, 128]):
        layer(f"synthesis.b{res}.conv0", f"convs.{2 * k}", 2 * k + 1)
        layer(f"synthesis.b{res}.conv1", f"convs.{2 * k + 1}", 2 * k + 2)
        layer(f"synthesis.b{res}.torgb", f"to_rgbs.{k}", rgb=True)
    sd, w_avg = nvidia_to_rosinality(nv)
    expected = {k: v for k, v in ours.items() if not k.endswith("kernel")}
    assert sd.keys() == expected.keys()
    assert all(torch.equal(sd[k], expected[k]) for k in sd)
    assert torch.equal(w_avg, nv["mapping.w_avg"])


# ----- untrusted files ---------------------------------------------------------------------------------------------
class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_a_shell_global_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": RunsShell(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match=r"refused pickle global '(posix|os|nt)\.system'"):
        load_generator(str(path))
    assert not marker.exists()


def test_torch_zip_with_a_shell_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": RunsShell(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_generator(str(path))
    assert not marker.exists()


def armed_nvidia_snapshot(tmp_path):
    """The real NVIDIA snapshot with its (blanked) module source replaced, at the same length, by code that would
    create a marker file if any loader executed it, as NVIDIA's own loader executes module_src."""
    data = reference_file("stylegan2", "nvidia_ada_small.pkl").read_bytes()
    header = b"# Source text of training/networks.py removed"
    start = data.index(header)
    end = start
    while data[end:end + 1] != b"\x94":  # the MEMOIZE opcode right after the string
        end += 1
    marker = tmp_path / "pwned"
    payload = f"import os\nos.system('touch {marker}')\n".encode()
    payload += b"#" * (end - start - len(payload))
    path = tmp_path / "network-snapshot-armed.pkl"
    path.write_bytes(data[:start] + payload + data[end:])
    return path, marker


def test_armed_fixture_really_runs_code_under_a_naive_loader(tmp_path):
    """Control: a persistence shim that executes module_src (what NVIDIA's loader does) does create the marker."""
    path, marker = armed_nvidia_snapshot(tmp_path)
    shim = textwrap.dedent(f"""
        import pickle, sys, types
        pkg = types.ModuleType("torch_utils"); mod = types.ModuleType("torch_utils.persistence")
        def _reconstruct_persistent_obj(meta):
            exec(meta["module_src"], {{}})
            return meta
        mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
        sys.modules.update({{"torch_utils": pkg, "torch_utils.persistence": mod}})
        for name in ("dnnlib", "dnnlib.util"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["dnnlib.util"].EasyDict = dict
        try:
            pickle.load(open({str(path)!r}, "rb"))
        except Exception:
            pass
    """)
    subprocess.run([sys.executable, "-c", shim], check=True, timeout=120)
    assert marker.exists()


def test_armed_nvidia_snapshot_loads_inert(tmp_path):
    path, marker = armed_nvidia_snapshot(tmp_path)
    G = load_generator(str(path))
    assert not marker.exists()
    c = load_cases("stylegan2", "nvidia_ada_small_cases.pt")
    with torch.no_grad():
        assert (G.synthesis(c["wsplus"]) - c["img_wsplus_const"]).abs().max() <= 1e-4


@pytest.mark.parametrize("content,message", [
    (b"", "found neither"),
    (b"hello, not a checkpoint", "found neither"),
    (pickle.dumps({"not": "a snapshot"}), "expected an NVIDIA snapshot with 'G_ema'"),
    (pickle.dumps([1, 2, 3])[:-3], "not a readable NVIDIA snapshot"),
])
def test_wrong_or_broken_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_generator(str(path))


def test_wrong_kind_of_torch_file_names_what_it_found(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.save({"state_dict": {}, "opts": {}}, path)
    with pytest.raises(CheckpointError, match=r"expected a rosinality checkpoint.*found keys \['opts', 'state_dict'\]"):
        load_generator(str(path))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_generator(str(tmp_path / "missing.pt"))


# ----- the bundled default generator ------------------------------------------------------------------------------
def test_default_generator_is_small_reproducible_and_in_range():
    assert DEFAULT_GENERATOR_PATH.stat().st_size <= 5_000_000
    shipped = load_default_generator()
    rebuilt = build_default_generator()
    assert shipped.architecture() == rebuilt.architecture()
    # Same recipe, same numbers (to float rounding: the output scale is measured through the generator's own maths).
    for (k, a), b in zip(shipped.state_dict().items(), rebuilt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)
    torch.testing.assert_close(shipped.w_avg, rebuilt.w_avg, rtol=1e-5, atol=1e-7)
    z = torch.randn(256, shipped.style_dim, generator=torch.Generator().manual_seed(12345))
    with torch.no_grad():
        w = shipped.mapping(z)
        for noise in ("const", "random"):
            img = shipped.synthesis(w, noise=noise, generator=torch.Generator().manual_seed(1))
            assert img.abs().max() <= 1.0 and img.std() > 0.05


def test_legacy_serialized_rosinality_checkpoint_loads_through_weights_only(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) writes a plain pickle stream (first byte 0x80, like an
    NVIDIA pickle): it is told apart by content and read with weights_only, giving the same generator."""
    ref = load_generator(str(reference_file("stylegan2", "rosinality_small.pt")))
    raw = torch.load(reference_file("stylegan2", "rosinality_small.pt"), weights_only=True)
    path = tmp_path / "legacy.pt"
    torch.save(raw, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    G = load_generator(str(path))
    assert G.source_format == "rosinality" and same_function(G, ref, tol=0)
    # a legacy file carrying code is still refused by weights_only
    torch.save({"g_ema": raw["g_ema"], "payload": os.system}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_generator(str(tmp_path / "evil.pt"))

"""The code a GPU runs, run on CPU behind the explicit switch: batched convolutions, GEMM affines and batched LPIPS
(`batch_invariant=False`) reach the invariant path's quality; losses and regularisers stay float32 under bf16
autocast; GPU actors size their batches by a memory probe."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from models.stylegan2 import batch_invariance, is_batch_invariant
from ops import metrics
from ops.invert import InvertConfig, Inverter, invert
from ops.regularizers import compute_p_space_stats, noise_regularizer, pnorm_penalty
from ops.stage import Column, Plan, Stage, largest_fitting_batch, objects

FAST = dict(lpips_net="alex", lpips_backbone="random")


class ConvBatches(TorchFunctionMode):
    """Records the batch size of every dense 2-D convolution that runs (the modulated convolutions; the FIR filters
    are depthwise, `groups=C`, and always batched)."""

    def __init__(self):
        super().__init__()
        self.sizes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, F.conv_transpose2d) and (kwargs or {}).get("groups", 1) == 1:
            self.sizes.add(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def samples(G, n, seed):
    with torch.no_grad():
        return G.synthesis(G.mapping(torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))))


def test_the_switch_picks_the_path(G):
    cpu = torch.device("cpu")
    assert is_batch_invariant(cpu) and not is_batch_invariant(torch.device("cuda"))  # auto
    with batch_invariance(False):
        assert not is_batch_invariant(cpu)
        with batch_invariance(True):
            assert is_batch_invariant(torch.device("cuda"))
    w = torch.randn(3, G.n_latent, G.style_dim)
    for enabled, sizes in ((True, {1}), (False, {3})):
        with batch_invariance(enabled), ConvBatches() as convs, torch.no_grad():
            G.synthesis(w)
        assert convs.sizes == sizes


@pytest.mark.slow
def test_the_device_path_reaches_the_invariant_paths_quality(G):
    """Same images (seeds used nowhere else), same recipe and budget: the batched path's PSNR is within 0.5 dB of the
    invariant path's, per image; and it really ran batched (convolutions of 4 images)."""
    images = samples(G, 4, seed=41)
    keys = [f"held-out/{i}" for i in range(4)]
    results = {}
    for invariant in (True, False):
        cfg = InvertConfig(space="wplus", steps=100, optimize_noise=False, batch_invariant=invariant, **FAST)
        with ConvBatches() as convs:
            results[invariant] = invert(G, images, keys, cfg)
        assert (4 in convs.sizes) == (not invariant)
    gap = (results[False]["psnr"] - results[True]["psnr"]).abs()
    assert gap.max() <= 0.5, gap
    assert results[True]["psnr"].min() > 30  # both actually inverted (start: ~27 dB at w_avg)


def test_losses_and_regularisers_are_float32_for_bf16_activations(G):
    """Every loss term handed bfloat16 activations (what synthesis under CUDA autocast produces), in a bf16 autocast
    context: its value is float32 and equals the float32 evaluation of the same values (1e-6), its gradient too
    (to the bf16 rounding of the gradient itself). Each term fails with its `.float()` removed."""
    stats = compute_p_space_stats(G, 2000, seed=3)
    wplus = (G.mapping(torch.randn(2, G.style_dim, generator=torch.Generator().manual_seed(4)))[:, None]
             .expand(-1, G.n_latent, -1).detach().clone() + 0.1)
    noises = [torch.randn(2, 1, r, r, generator=torch.Generator().manual_seed(r)) for r in (8, 16, 32)]
    a, b = samples(G, 2, 5), samples(G, 2, 6).bfloat16()
    terms = {"pnorm": lambda x: pnorm_penalty(x, stats), "noise": lambda n: noise_regularizer(n),
             "mse": lambda x: metrics.mse(x, b if x[0].dtype == torch.bfloat16 else b.float()),
             "psnr": lambda x: metrics.psnr(x, b if x[0].dtype == torch.bfloat16 else b.float())}
    inputs = {"pnorm": wplus, "noise": noises, "mse": a, "psnr": a}

    def evaluate(name, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs[name]] if name == "noise" else \
            inputs[name].detach().to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            value = terms[name](leaves)
        value.sum().backward()
        grad = torch.cat([t.grad.float().flatten() for t in leaves]) if name == "noise" else \
            leaves.grad.float().flatten()
        return value.detach(), grad

    for name in terms:
        inputs[name] = [t.bfloat16().float() for t in inputs[name]] if name == "noise" else \
            inputs[name].bfloat16().float()  # values a bf16 tensor can hold: both paths see the same numbers
        (v32, g32), (v16, g16) = evaluate(name, torch.float32), evaluate(name, torch.bfloat16)
        assert v16.dtype == torch.float32, name
        assert ((v16 - v32).abs() <= 1e-6 * v32.abs()).all(), (name, v16, v32)
        assert (g16 - g32).norm() <= 2 ** -7 * g32.norm(), name


@pytest.mark.parametrize("term", ["mse", "noise", "f", "pnorm"])
def test_each_term_of_the_inverters_objective_is_float32_under_autocast(G, term):
    """Each term of the objective but LPIPS (MSE, noise, F anchor, P_N+), alone (the MSE weight, which cannot be 0,
    made negligible), with bfloat16 image, target, latents, base code and noise maps in a bf16 autocast context
    equals its float32 evaluation of the same values (1e-6)."""
    weights = dict(mse_weight=1.0 if term == "mse" else 1e-12, noise_weight=1.0 if term == "noise" else 0.0,
                   f_weight=1.0 if term == "f" else 0.0, pnorm_weight=1.0 if term == "pnorm" else 0.0)
    images = samples(G, 2, 7)
    cfg = InvertConfig(space="fwplus", steps=1, lpips_weight=0, pnorm_samples=2000, base_level=8,
                       optimize_noise=term == "noise", **weights, **FAST)
    inverter = Inverter(G, cfg)
    v = {k: t.detach() for k, t in inverter._initial_variables(images).items()}
    base0 = v["base_code"]
    noises = [n.expand(2, -1, -1, -1) for n in G.make_noise(1)]
    img = inverter._render(v, noises, 0.0, None).detach() + 0.01
    v = {k: t + 0.1 for k, t in v.items()}
    img16, images16, base16 = (x.bfloat16() for x in (img, images, base0))
    v16, noises16 = {k: t.bfloat16() for k, t in v.items()}, [n.bfloat16() for n in noises]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = inverter._loss(img16, images16, v16, base16, noises16)
    plain = inverter._loss(img16.float(), images16.float(), {k: t.float() for k, t in v16.items()}, base16.float(),
                           [n.float() for n in noises16])
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, plain, rtol=1e-6, atol=0), (mixed, plain)


def test_gpu_actors_probe_the_largest_batch_that_fits_and_run_in_chunks():
    def fits_up_to(limit):
        def try_batch(n):
            if n > limit:
                raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return try_batch

    assert largest_fitting_batch(fits_up_to(5), 64) == 4
    assert largest_fitting_batch(fits_up_to(100), 24) == 24
    with pytest.raises(MemoryError):
        largest_fitting_batch(fits_up_to(0), 64)

    class Doubler(Stage):
        name, calls = "doubler", []

        def prepare(self, context):
            return Plan(outputs=(Column("y", "float64"),))

        def compute(self, batch):
            self.calls.append(len(batch["key"]))
            return {"y": 2.0 * batch["x"]}

    stage = Doubler().ready()
    stage.chunk = 3
    n = 7
    out = stage.process({"key": objects([str(i) for i in range(n)]), "status": objects(["ok"] * n),
                         "error_code": objects([""] * n), "error": objects([""] * n), "x": np.arange(n, dtype=float)})
    assert stage.calls == [3, 3, 1] and np.array_equal(out["y"], 2.0 * np.arange(n))

"""One command for the day a GPU is available:

    python benchmarks/device_check.py --out out/device_check        # on the GPU machine, under 8 minutes
    python benchmarks/device_check.py --quick --out /tmp/dc          # tiny, on CPU, under 3 minutes (a test runs it)

1. parity: our generator on the device against the same generator in float64 on CPU, on the golden cases of
   ../shared/reference/stylegan2 (`parity_max_abs`, and the distance to the official outputs);
2. inversion throughput (W+ steps, batched path) at 1024 config-f with random weights in the rosinality format,
   batch 1/4/8/16/32, float32, TF32 and bf16 autocast, with and without torch.compile: image-steps/s, peak memory,
   achieved TFLOP/s (FLOPs of a step counted by FlopCounterMode);
3. drift of an image's result with its batch on the device (the batched path).
Writes OUT/device_check.json; the full run also writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.report import machine_line, write_section  # noqa: E402
from models.checkpoints import load_generator  # noqa: E402
from models.default_generator import load_default_generator  # noqa: E402
from models.stylegan2 import Generator, batch_invariance  # noqa: E402
from ops.invert import InvertConfig, Inverter  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "stylegan2"
FAST = dict(lpips_net="alex", lpips_backbone="random", optimize_noise=False, batch_invariant=False)
FULL = dict(size=1024, batches=(1, 4, 8, 16, 32), precisions=("fp32", "tf32", "bf16"), compile_batches=(8,), steps=5,
            drift_steps=50)
QUICK = dict(size=64, batches=(1, 2), precisions=("fp32", "bf16"), compile_batches=(), steps=2, drift_steps=10)


def parity(device: torch.device) -> dict:
    """Golden W+ cases through our generator on the device (float32) and on CPU in float64."""
    G = load_generator(str(REFERENCE / "rosinality_small.pt"))
    cases = torch.load(REFERENCE / "rosinality_small_cases.pt", weights_only=True)
    noise = [cases[f"noise_{i}"] for i in range(G.num_layers)]
    with torch.no_grad(), batch_invariance(False):
        ours = G.to(device).synthesis(cases["wplus"].to(device), noise=[n.to(device) for n in noise]).cpu()
        exact = G.cpu().double().synthesis(cases["wplus"].double(), noise=[n.double() for n in noise])
    return {"parity_max_abs": (ours.double() - exact).abs().max().item(),
            "golden_max_abs": (ours - cases["img_c_wplus"]).abs().max().item(), "golden_case": "img_c_wplus"}


def random_config_f(size: int, folder: Path):
    """A random-weight config-f generator written in rosinality's checkpoint layout, loaded back by our loader."""
    if size <= 64:
        return load_default_generator()
    torch.manual_seed(0)
    G = Generator(size)
    path = folder / f"random-config-f-{size}.pt"
    torch.save({"g_ema": G.state_dict(), "latent_avg": G.mean_latent(1000)[0]}, path)
    return load_generator(str(path))


def step_flops(inverter: Inverter, images: torch.Tensor) -> float:
    v = {k: t.requires_grad_(True) for k, t in inverter._initial_variables(images).items()}
    with FlopCounterMode(display=False) as counter, batch_invariance(False):
        img = inverter._render(v, inverter.G.make_noise(1), 0.0, None)
        inverter._loss(img, images, v, None, None).sum().backward()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(G, device: torch.device, batch: int, precision: str, compiled: bool, steps: int) -> dict:
    """image-steps/s, peak memory and TFLOP/s of W+ inversion steps at one setting; "oom" when it does not fit."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    cfg = InvertConfig(space="wplus", steps=steps, autocast=precision == "bf16", compile=compiled, **FAST)
    row = {"batch": batch, "precision": precision, "compile": compiled}
    try:
        inverter = Inverter(G, cfg)
        images = torch.zeros(batch, 3, G.size, G.size, device=device)
        keys = [f"k{i}" for i in range(batch)]
        inverter.run(images, keys, steps=1)  # warm-up (compilation)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        t0 = time.perf_counter()
        inverter.run(images, keys)
        synchronize(device)
        seconds = time.perf_counter() - t0
        flops = step_flops(inverter, images[:1]) * batch
    except Exception as exc:
        if "out of memory" not in str(exc).lower():
            raise
        return {**row, "oom": True}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {**row, "image_steps_per_s": batch * steps / seconds, "peak_memory_mb": peak,
            "tflops": flops * steps / seconds / 1e12}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drift(device: torch.device, steps: int) -> dict:
    """The bundled model on the device, batched path: image 0 inverted alone vs in a batch of 4."""
    G = load_default_generator().to(device)
    with torch.no_grad():
        w = G.mapping(torch.randn(4, G.style_dim, generator=torch.Generator().manual_seed(7)).to(device))
        images = G.synthesis(w).clamp(-1, 1)
    inverter = Inverter(G, InvertConfig(space="wplus", steps=steps, **FAST))
    keys = [f"k{i}" for i in range(4)]
    batch, alone = inverter.run(images, keys), inverter.run(images[:1], keys[:1])
    return {"steps": steps, "max_abs_wplus": (batch["wplus"][0] - alone["wplus"][0]).abs().max().item(),
            "abs_psnr_db": (batch["psnr"][0] - alone["psnr"][0]).abs().item()}


def report(result: dict) -> str:
    rows = ["| batch | precision | compile | image-steps/s | peak memory (MiB) | TFLOP/s |", "|---:|---|---|---:|---:|---:|"]
    for r in result["throughput"]:
        rows.append(f"| {r['batch']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | " + (
            "out of memory | | |" if r.get("oom") else
            f"{r['image_steps_per_s']:.1f} | {r['peak_memory_mb']:.0f} | {r['tflops']:.2f} |"))
    d, p = result["drift"], result["parity"]
    return "\n".join([
        "## Device check (`benchmarks/device_check.py`)", "",
        f"Device: {result['device_name']}; {machine_line()}. {result['model']}, W+ inversion on the batched path, "
        "LPIPS-alex (random backbone), constant noise; peak memory is CUDA's allocator peak (on CPU: the process's "
        "peak RSS).", "",
        f"Parity on the golden cases: max |device − CPU float64| = {p['parity_max_abs']:.2e} "
        f"(vs the official output: {p['golden_max_abs']:.2e}).", "",
        *rows, "",
        f"Batch drift on the device after {d['steps']} steps: max |ΔW+| {d['max_abs_wplus']:.2e}, |ΔPSNR| "
        f"{d['abs_psnr_db']:.3f} dB.",
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/device_check", help="folder for device_check.json")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration on CPU (under 3 minutes)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present; --quick: cpu)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    t0 = time.time()
    model = "the bundled 64-px generator" if plan["size"] <= 64 else \
        f"{plan['size']}-px config-f with random weights (rosinality layout)"
    result = {"device": str(device), "quick": args.quick, "size": plan["size"], "model": model,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "parity": parity(device), "throughput": []}
    with tempfile.TemporaryDirectory() as tmp:
        G = random_config_f(plan["size"], Path(tmp)).to(device)
        for batch in plan["batches"]:
            for precision in plan["precisions"]:
                for compiled in (False, True) if batch in plan["compile_batches"] else (False,):
                    result["throughput"].append(throughput(G, device, batch, precision, compiled, plan["steps"]))
                    print(json.dumps(result["throughput"][-1]), flush=True)
    result["drift"] = drift(device, plan["drift_steps"])
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(result, indent=1))
    print(report(result))
    if not args.quick:
        write_section("device_check", report(result))
    return result


if __name__ == "__main__":
    main()

"""`benchmarks/device_check.py --quick` runs end to end on CPU, so the script is ready for the day a GPU is."""

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import reference_file
from models.default_generator import load_default_generator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import device_check  # noqa: E402
from benchmarks.device_check import peak_rss_mb  # noqa: E402


def test_device_check_quick_runs_and_reports_every_figure(tmp_path):
    reference_file("stylegan2", "rosinality_small.pt")  # skips with the reason when the goldens are absent
    result = device_check.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["device"] == "cpu" and saved["quick"] is True
    assert saved["parity"]["parity_max_abs"] < 1e-4 and saved["parity"]["golden_max_abs"] < 1e-4
    rows = saved["throughput"]
    assert {(r["batch"], r["precision"]) for r in rows} == {(1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")}
    # FLOPs per image-step (TFLOP/s over image-steps/s) are one model's, whatever the batch and precision, and at
    # least a forward + backward of the synthesis (counted here on its own, independently of the inverter)
    per_step = [r["tflops"] * 1e12 / r["image_steps_per_s"] for r in rows]
    assert max(per_step) <= 1.01 * min(per_step), per_step
    G = load_default_generator()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        G.synthesis(G.mapping(torch.randn(1, G.style_dim))[:, None].expand(-1, G.n_latent, -1))
    assert 2.5 * counter.get_total_flops() <= per_step[0] <= 20 * counter.get_total_flops()
    assert all(200 < r["peak_memory_mb"] <= peak_rss_mb() for r in rows)  # CPU: this process's peak RSS, in MiB
    # an image inverted in a batch of 4 vs alone (batched path): the same result up to float reassociation
    assert saved["drift"]["steps"] == 10
    assert saved["drift"]["max_abs_wplus"] < 1e-3 and saved["drift"]["abs_psnr_db"] < 0.01, saved["drift"]
    assert "Parity on the golden cases" in device_check.report(result)

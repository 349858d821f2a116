"""`benchmarks/device_check.py --quick` runs end to end on CPU, so the script is ready for the day a GPU is."""

import json
import sys
from pathlib import Path

from conftest import reference_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import device_check  # noqa: E402


def test_device_check_quick_runs_and_reports_every_figure(tmp_path):
    reference_file("stylegan2", "rosinality_small.pt")  # skips with the reason when the goldens are absent
    result = device_check.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["device"] == "cpu" and saved["quick"] is True
    assert saved["parity"]["parity_max_abs"] < 1e-4 and saved["parity"]["golden_max_abs"] < 1e-4
    rows = saved["throughput"]
    assert {(r["batch"], r["precision"]) for r in rows} == {(1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")}
    assert all(r["image_steps_per_s"] > 0 and r["tflops"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert saved["drift"]["steps"] == 10 and saved["drift"]["max_abs_wplus"] >= 0
    assert "Parity on the golden cases" in device_check.report(result)

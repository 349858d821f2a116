import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def reference_file(*parts: str) -> Path:
    """A golden file under ../shared/reference; skip (with the reason) when that folder is absent."""
    path = REFERENCE.joinpath(*parts)
    if not REFERENCE.is_dir():
        pytest.skip(f"golden reference folder {REFERENCE} is absent (it ships beside the repo in CI)")
    assert path.exists(), f"missing golden file {path}"
    return path


def load_cases(*parts: str) -> dict:
    return torch.load(reference_file(*parts), weights_only=True)

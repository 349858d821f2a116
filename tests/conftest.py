import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Ray workers started by the tests import stages defined in test modules (fault injection): they inherit this.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH"))
                                           if p)


def reference_file(*parts: str) -> Path:
    """A golden file under ../shared/reference; skip (with the reason) when that folder is absent."""
    path = REFERENCE.joinpath(*parts)
    if not REFERENCE.is_dir():
        pytest.skip(f"golden reference folder {REFERENCE} is absent (it ships beside the repo in CI)")
    assert path.exists(), f"missing golden file {path}"
    return path


def load_cases(*parts: str) -> dict:
    return torch.load(reference_file(*parts), weights_only=True)


def key_listing(*parts: str) -> dict[str, tuple[int, ...]]:
    """A golden key listing (`name<ws>(shape) dtype` or `name<tab>[shape]`) -> {name: shape}."""
    import re

    rows = {}
    for line in reference_file(*parts).read_text().splitlines():
        name, rest = line.split(None, 1)
        rows[name] = tuple(int(v) for v in re.findall(r"\d+", re.search(r"[(\[]([^)\]]*)", rest).group(1)))
    return rows


def read_parts(out: Path):
    """Every part file of a stage output as one pyarrow table."""
    import pyarrow.parquet as pq

    return pq.read_table([str(p) for p in sorted(Path(out).glob("part-*.parquet"))])


def tensor(table, column: str):
    return table.column(column).combine_chunks().to_numpy_ndarray()

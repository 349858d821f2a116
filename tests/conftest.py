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


S3_SECRET = "s3cr3t-value-never-logged"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    """A real S3 API server (moto) on 127.0.0.1, with the AWS environment pointing at it; yields a boto3 client.
    Set before Ray starts: local workers inherit the driver's environment."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # clients made for an earlier server must not be reused
    yield boto3.client("s3", endpoint_url=endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


import os
import time
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = Path(os.environ.get("LATENTRAY_REFERENCE", SHARED / "reference"))
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")  # .ci/run sets it; so do CI services

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Ray workers started by the tests import stages defined in test modules (fault injection): they inherit this.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH"))
                                           if p)


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # for CLI subprocesses


def no_align():
    """Photo reader options for generator samples: no face to detect, centre crop."""
    from ops.align import AlignConfig
    from ops.ingest import IngestConfig

    return IngestConfig(alignment=AlignConfig("none"))


@pytest.fixture(scope="session")
def G():
    """The bundled 64-px generator (untrained, seeded)."""
    from models.default_generator import load_default_generator

    return load_default_generator()


@pytest.fixture(scope="session")
def local_ray():
    """Local Ray as every run starts it (tests calling stages through the runtime in-process)."""
    from pipelines.runtime import init_ray

    init_ray()


def write_samples(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n PNG samples of the bundled generator (z seeded) as 00.png, 01.png, ...; returns the names."""
    from PIL import Image

    from models.default_generator import load_default_generator
    from ops.images import to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    G = load_default_generator()
    with torch.no_grad():
        images = G.synthesis(G.mapping(torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))))
    names = [f"{i:02d}.png" for i in range(n)]
    for name, a in zip(names, to_uint8(images)):
        Image.fromarray(a).save(folder / name)
    return names


def stored_keys(out: Path) -> list[str]:
    """Every key stored in an output's parts, in part order (duplicates would show)."""
    import pyarrow.parquet as pq

    keys = []
    for part in sorted(out.glob("part-*.parquet")):
        keys += pq.read_table(part, columns=["key"]).column("key").to_pylist()
    return keys


def wait_for(predicate, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def reference_file(*parts: str) -> Path:
    """A golden file under ../shared/reference. Without that folder: skipped on a developer's machine, a failure in
    CI (where it ships beside the repo), so goldens can never go quietly untested."""
    path = REFERENCE.joinpath(*parts)
    if not REFERENCE.is_dir():
        message = f"golden reference folder {REFERENCE} is absent (it ships beside the repo in CI)"
        if IN_CI:
            pytest.fail(message + "; CI=true: a missing golden is a failure", pytrace=False)
        pytest.skip(message)
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


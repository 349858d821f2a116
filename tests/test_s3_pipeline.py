"""`latentray invert` from s3:// to s3:// against a real S3 API server (moto) on 127.0.0.1."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import S3_SECRET as SECRET
from models.default_generator import load_default_generator
from ops.images import to_uint8
from pipelines.cli import main


@pytest.fixture()
def s3(s3_server):
    import ray

    ray.shutdown()  # local workers inherit the driver's environment when Ray starts: restart with the server's
    s3_server.create_bucket(Bucket="photos")
    s3_server.create_bucket(Bucket="latents")
    yield s3_server
    ray.shutdown()


def test_invert_s3_to_s3_without_leaking_credentials(s3, capsys):
    import io

    G = load_default_generator()
    with torch.no_grad():
        img = G.synthesis(G.mapping(torch.randn(2, G.style_dim, generator=torch.Generator().manual_seed(1))))
    for i, a in enumerate(to_uint8(img)):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        s3.put_object(Bucket="photos", Key=f"in/{i}.png", Body=buf.getvalue())
    s3.put_object(Bucket="photos", Key="in/broken.jpg", Body=b"not an image")
    code = main(["invert", "--input", "s3://photos/in/", "--output", "s3://latents/run1", "--steps", "2",
                 "--align", "none",
                 "--lpips-net", "alex", "--lpips-backbone", "random"])
    assert code == 0
    objects = {o["Key"] for o in s3.list_objects_v2(Bucket="latents")["Contents"]}
    parts = [k for k in objects if k.startswith("run1/part-")]
    assert {"run1/run.json", "run1/stats.json"} <= objects and parts
    rows = {}
    for key in parts:
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket="latents", Key=key)["Body"].read()))
        rows.update(zip(table.column("key").to_pylist(), table.column("status").to_pylist()))
        assert np.isfinite(table.column("wplus").combine_chunks().to_numpy_ndarray()[
            np.array(table.column("status").to_pylist()) == "ok"]).all()
    assert rows == {"0.png": "ok", "1.png": "ok", "broken.jpg": "failed"}
    for name in ("run1/run.json", "run1/stats.json"):
        assert SECRET not in s3.get_object(Bucket="latents", Key=name)["Body"].read().decode()
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err

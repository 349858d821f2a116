"""cluster.yaml is a valid Ray cluster-launcher config (checked offline against Ray's own schema)."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema_and_has_a_gpu_pool():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert config["docker"]["image"].startswith("rayproject/ray:" + ray.__version__)
    assert workers["resources"]["GPU"] >= 1  # the autoscaler must know a GPU actor fits a gpu_worker
    assert any(c.startswith("latentray fetch-weights") for c in config["setup_commands"])  # workers never download


def test_the_head_serves_its_dashboard_and_job_api_on_localhost_only():
    """No unauthenticated port open to the network: every `ray start --head` binds the dashboard to 127.0.0.1."""
    import re

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    heads = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert heads and all(re.findall(r"--dashboard-host[= ](\S+)", c) == ["127.0.0.1"] for c in heads)

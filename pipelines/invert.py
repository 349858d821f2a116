"""`latentray invert`: photos (decoded and aligned by ingest tasks) or an `ingest` output -> latents
(ops/invert_stage.py)."""

from ops.ingest import IngestConfig, IngestStage
from ops.invert_stage import InvertStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    InvertStage, "ingest + align + invert images into latents (Parquet)",
    photos=IngestStage.feeding, photos_config=IngestConfig, rename=lambda stage: {"aligned": "image"},
    examples=("latentray invert --input photos/ --output out/latents --generator ffhq.pt --spaces wplus,fwplus",
              "latentray invert --input s3://bucket/aligned --output s3://bucket/latents --set steps=300"))

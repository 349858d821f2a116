"""`latentray ingest`: photos -> decoded, aligned crops with their geometry (ops/ingest.py)."""

from ops.ingest import IngestStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    IngestStage, "decode + align photos; crops and geometry to Parquet (invert, translate, ... read it)",
    photos="self", outputs=False,
    examples=("latentray ingest --input photos/ --output out/aligned --size 1024",
              "latentray ingest --input s3://bucket/photos/ --output s3://bucket/aligned --align none"))

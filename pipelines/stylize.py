"""`latentray stylize`: faces x exemplars through DualStyleGAN (ops/stylize.py)."""

from ops.ingest import IngestConfig, IngestStage
from ops.stylize import StylizeStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    StylizeStage, "DualStyleGAN exemplar style transfer onto faces",
    photos=IngestStage.feeding, photos_config=IngestConfig, outputs=False,
    examples=("latentray stylize --input faces/ --output out/cartoon --dualstylegan generator.pt --encoder "
              "encoder.pt --exstyles exstyle_code.npy --styles 53,26",
              "latentray stylize --input faces/ --output out/cartoon --dualstylegan generator.pt --encoder "
              "encoder.pt --exstyles exstyle_code.npy --preserve-color"))

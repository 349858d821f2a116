"""`latentray destylize`: artistic portraits -> paired realistic faces (DualStyleGAN; ops/destylize.py)."""

from ops.destylize import DestylizeStage
from ops.ingest import IngestConfig, IngestStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    DestylizeStage, "artistic portraits -> paired realistic faces (DualStyleGAN destylization)",
    photos=IngestStage.feeding, photos_config=IngestConfig, outputs=False,
    examples=("latentray destylize --input portraits/ --output out/pairs --finetuned g_ft.pt --encoder encoder.pt",
              "latentray destylize --input portraits/ --output out/pairs --finetuned g_ft.pt --encoder encoder.pt "
              "--identity model_ir_se50.pth --align none"))

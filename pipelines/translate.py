"""`latentray translate`: photos, or an image column of a stage output, through a CycleGAN generator
(ops/translate.py)."""

from ops.ingest import DecodeOnlyConfig, DecodeStage
from ops.translate import TranslateStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    TranslateStage, "CycleGAN translation of photos or of a stage's images",
    photos=lambda stage, config: DecodeStage(config), photos_config=DecodeOnlyConfig,
    rename=lambda stage: {stage.config.column: "image"},
    examples=("latentray translate --input photos/ --output out/zebra --cyclegan latest_net_G_A.pth",
              "latentray translate --input out/aligned --column aligned --output out/b --cyclegan latest_net_G_A.pth"))

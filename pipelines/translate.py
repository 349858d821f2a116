"""`latentray translate`: photos, or an image column of a stage output, through a CycleGAN or pix2pix generator
(ops/translate.py)."""

from ops.ingest import DecodeOnlyConfig, DecodeStage
from ops.translate import TranslateStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    TranslateStage, "CycleGAN or pix2pix translation of photos or of a stage's images",
    photos=lambda stage, config: DecodeStage(config), photos_config=DecodeOnlyConfig,
    rename=lambda stage: {stage.config.column: "image"},
    examples=("latentray translate --input photos/ --output out/zebra --translator latest_net_G_A.pth",
              "latentray translate --input out/aligned --column aligned --output out/b --translator latest_net_G.pth "
              "--batch-stats --dropout"))

"""`latentray channels`: StyleSpace channel statistics of an invert output (ops/channels.py)."""

from ops.channels import ChannelsStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    ChannelsStage, "StyleSpace channel statistics of an invert output (population, attribute, local channels)",
    examples=("latentray channels --input out/latents --output out/channels --exemplars smiling_keys.txt",
              "latentray channels --input out/latents --output out/channels --local-sample 200"))

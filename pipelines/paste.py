"""`latentray paste`: reconstructed or edited aligned faces back into their photos (ops/paste.py)."""

from ops.paste import PasteStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    PasteStage, "put edited (or reconstructed) aligned faces back into the original photos",
    examples=("latentray paste --input out/edits --photos out/latents --output out/pasted",
              "latentray paste --input out/latents --space wplus --output out/reconstructed_in_photo"))

"""`latentray edit`: an invert output -> one row per (input, edit, strength), rendered (ops/edit.py)."""

from ops.edit import EDITS_FORMAT, EditStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    EditStage, "apply latent edits to an invert output; render them",
    examples=("latentray edit --input out/latents --output out/edits --edits edits.yaml",
              "latentray edit --input out/latents --output out/moved --edits geometric.yaml --space fwplus"),
    epilog=EDITS_FORMAT)

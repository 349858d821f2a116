"""`latentray dci`: DCI disentanglement of an invert output's latent spaces against attributes (ops/dci.py)."""

from ops.dci import DciStage
from pipelines.runtime import Adapter

ADAPTER = Adapter(
    DciStage, "DCI disentanglement (D, C, I) of W, W+ and S against attributes",
    examples=("latentray dci --input out/latents --output out/dci --attributes attributes.csv --spaces w,wplus,s",
              "latentray dci --input out/latents --output out/dci --attribute-columns n_faces,face_score"))

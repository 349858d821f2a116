"""ArcFace IR-SE50 identity network (TreB1eN `Backbone(112, 50, 'ir_se')`, the `model_ir_se50.pth` layout pSp's and
DualStyleGAN's ID losses use; shared/reference/encoders/README.md). Takes 256x256 faces in [-1, 1] and applies the
pSp crop and pooling itself; returns L2-normalised embeddings."""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoints import CheckpointError, load_state
from models.encoders import IRSE50_UNITS, irse_body

STAGE_STARTS = [sum(IRSE50_UNITS[:i]) for i in range(4)]  # first unit of each stage: 0, 3, 7, 21


class ArcFace(nn.Module):
    def __init__(self, widths: list[int], embedding: int = 512, drop_ratio: float = 0.6):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                         nn.PReLU(widths[0]))
        self.body = irse_body(widths, widths[0])
        self.output_layer = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.Dropout(drop_ratio), nn.Flatten(),
                                          nn.Linear(widths[3] * 7 * 7, embedding), nn.BatchNorm1d(embedding))

    @staticmethod
    def face_crop(faces: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> the pSp ID-loss input [B, 3, 112, 112]: bring to 256 by block averaging,
        crop rows 35..222 and columns 32..219, adaptive-average-pool 188 -> 112 (overlapping windows)."""
        if faces.shape[-1] != 256:
            faces = F.adaptive_avg_pool2d(faces, (256, 256))
        return F.adaptive_avg_pool2d(faces[:, :, 35:223, 32:220], (112, 112))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(self.face_crop(faces))))
        return x / x.norm(dim=1, keepdim=True)  # no eps, as the reference


def load_arcface(path: str, device: str | torch.device = "cpu") -> ArcFace:
    """A TreB1eN-layout state dict (e.g. model_ir_se50.pth) -> eval-mode ArcFace (weights_only load; widths and
    embedding size read off the keys)."""
    state = load_state(str(path), what="a torch state dict")
    if not isinstance(state, dict) or "output_layer.3.weight" not in state or "body.0.res_layer.1.weight" not in state:
        found = ", ".join(list(state)[:4]) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: expected an ArcFace IR-SE50 state dict (input_layer.*, body.*, "
                              f"output_layer.3.weight), found {found}")
    widths = [state[f"body.{i}.res_layer.1.weight"].shape[0] for i in STAGE_STARTS]
    net = ArcFace(widths, state["output_layer.3.weight"].shape[0])
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit IR-SE50 with widths {widths}: {exc}") from None
    return net.to(device).eval().requires_grad_(False)

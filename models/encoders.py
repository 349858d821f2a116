"""Encoders that give inversion its starting point.

`BaseCodeEncoder` (BDInvert, spec/bdinvert.md §2.1): a VGG-like stack, image -> base code F [B, C, s, s].
Its checkpoint records the generator it was trained for and refuses to pair with another one.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

BASECODE_FORMAT = "latentray.basecode_encoder"


class BaseCodeEncoder(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> base code [B, out_channels, level, level].

    Input is resized to `8 * level` (the release's rule); log2(8) = 3 stages of three 3x3 convs (BatchNorm +
    LeakyReLU 0.2) then 2x2 average pooling; stage b has min(width * 2^b, max_width) channels (128/512 in the
    release); a head of two convs to `out_channels`, the last one linear.
    """

    kind = "base_code"

    def __init__(self, level: int, out_channels: int, width: int = 128, max_width: int = 512):
        super().__init__()
        self.level, self.out_channels, self.width, self.max_width = level, out_channels, width, max_width
        self.input_size = 8 * level
        layers, cin = [], 3
        for b in range(int(math.log2(self.input_size // level))):
            cout = min(width * 2**b, max_width)
            for _ in range(3):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
                cin = cout
            layers.append(nn.AvgPool2d(2))
        layers += [nn.Conv2d(cin, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.2),
                   nn.Conv2d(out_channels, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        self.generator_id: str | None = None

    def architecture(self) -> dict:
        return {"level": self.level, "out_channels": self.out_channels, "width": self.width,
                "max_width": self.max_width}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic",
                                   align_corners=False, antialias=images.shape[-1] > self.input_size)
        return self.net(images)


def save_basecode_encoder(encoder: BaseCodeEncoder, path: str) -> None:
    torch.save({"format": BASECODE_FORMAT, "version": 1, "architecture": json.dumps(encoder.architecture()),
                "generator_id": encoder.generator_id,
                "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}}, path)


def load_basecode_encoder(path: str, generator=None) -> BaseCodeEncoder:
    """Load (weights_only) in eval mode; with `generator`, refuse unless it is the one the encoder was trained for."""
    from models.checkpoints import CheckpointError, read_bytes

    import io

    obj = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != BASECODE_FORMAT:
        raise CheckpointError(f"{path}: expected a latentray base-code encoder, found "
                              f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__}")
    encoder = BaseCodeEncoder(**json.loads(obj["architecture"]))
    encoder.load_state_dict(obj["state_dict"])
    encoder.generator_id = obj["generator_id"]
    if generator is not None and getattr(generator, "generator_id", None) != encoder.generator_id:
        raise CheckpointError(f"{path}: this base-code encoder was trained for generator "
                              f"{str(encoder.generator_id)[:12]}, not {str(getattr(generator, 'generator_id', None))[:12]}")
    return encoder.eval().requires_grad_(False)

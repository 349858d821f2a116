"""Encoders that give inversion its starting point.

* `BaseCodeEncoder` (BDInvert, spec/bdinvert.md §2.1): a VGG-like stack, image -> base code F [B, C, s, s].
  Its checkpoint records the generator it was trained for and refuses to pair with another one.
* `StyleEncoder`: pSp's GradualStyleEncoder and e4e's Encoder4Editing (the same modules; e4e predicts row 0 and
  adds deltas to it), on the IR-SE50 backbone, loaded from the official checkpoints (reference/encoders/README.md).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import CheckpointError, load_state
from models.stylegan2 import EqualLinear

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
    obj = load_state(str(path))
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


# ----- pSp / e4e ---------------------------------------------------------------------------------------------------
IRSE50_UNITS = (3, 4, 14, 3)  # units per stage; the first unit of every stage has stride 2
TAPS = (6, 20, 23)  # body units whose outputs feed the feature pyramid (c1, c2, c3)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate


class IRSEUnit(nn.Module):
    """bottleneck_IR_SE: BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN -> SE, plus a (subsampling) shortcut."""

    def __init__(self, cin: int, depth: int, stride: int):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
                                       nn.PReLU(depth), nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
                                       nn.BatchNorm2d(depth), SqueezeExcite(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def irse_body(widths: list[int], cin: int) -> nn.Sequential:
    units = []
    for depth, n in zip(widths, IRSE50_UNITS):
        for i in range(n):
            units.append(IRSEUnit(cin, depth, 2 if i == 0 else 1))
            cin = depth
    return nn.Sequential(*units)


class GradualStyleBlock(nn.Module):
    """map2style: log2(spatial) stride-2 3x3 convs (LeakyReLU slope 0.01) to 1x1, then an equalised linear."""

    def __init__(self, cin: int, cout: int, spatial: int):
        super().__init__()
        layers = []
        for i in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(cout, cout)
        self.cout = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(-1, self.cout))


class StyleEncoder(nn.Module):
    """pSp (`delta_rows=False`) or e4e (`delta_rows=True`) encoder: images [B,3,H,W] in [-1,1] -> W+ [B,n_styles,D].

    Images are resized to `input_size` (bilinear, antialiased when shrinking): 256 in the official releases; encoders
    latentray trains for generators below 256 px read them at their own size (16x fewer operations at 64 px).
    `latent_avg` ([n_styles, D] or [D]) is added when the checkpoint was trained with start_from_latent_avg, so the
    output is a usable W+ latent.
    """

    kind = "wplus"

    def __init__(self, widths: list[int], style_dim: int, n_styles: int, delta_rows: bool = False,
                 latent_avg: torch.Tensor | None = None, input_size: int = 256):
        super().__init__()
        if input_size < 64 or input_size & (input_size - 1):
            raise ValueError(f"encoder input size must be a power of two >= 64, got {input_size}")
        self.input_size, self.widths, self.style_dim = input_size, list(widths), style_dim
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                         nn.PReLU(widths[0]))
        self.body = irse_body(widths, widths[0])
        # the style blocks read the body's 1/16 (coarse rows), 1/8 (middle) and 1/4 (fine) feature maps
        spatial = [input_size // (16 if i < 3 else 8 if i < 7 else 4) for i in range(n_styles)]
        self.styles = nn.ModuleList(GradualStyleBlock(widths[3], style_dim, s) for s in spatial)
        self.latlayer1 = nn.Conv2d(widths[2], widths[3], 1)
        self.latlayer2 = nn.Conv2d(widths[1], widths[3], 1)
        self.delta_rows, self.n_styles = delta_rows, n_styles
        self.register_buffer("latent_avg", None if latent_avg is None else latent_avg.float(), persistent=False)
        self.generator_id: str | None = None

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c3, p2, p1): the coarse tap and the two pyramid levels the style blocks read."""
        x = self.input_layer(images)
        taps = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in TAPS:
                taps.append(x)
        c1, c2, c3 = taps
        p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
        p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
        return c3, p2, p1

    def raw_codes(self, images: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        """Encoder output before latent_avg. e4e: `stage` = how many delta rows to add (None = all)."""
        feats = self.features(images)
        source = [feats[0 if i < 3 else 1 if i < 7 else 2] for i in range(self.n_styles)]
        if not self.delta_rows:
            return torch.stack([block(f) for block, f in zip(self.styles, source)], dim=1)
        w0 = self.styles[0](source[0])
        w = w0[:, None].repeat(1, self.n_styles, 1)
        last = self.n_styles - 1 if stage is None else min(stage, self.n_styles - 1)
        for i in range(1, last + 1):
            w[:, i] = w[:, i] + self.styles[i](source[i])
        return w

    def forward(self, images: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        """W+ of `images`; e4e's `stage` (progressive training) limits the delta rows added to row 0."""
        size = self.input_size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > size)
        codes = self.raw_codes(images, stage)
        return codes if self.latent_avg is None else codes + self.latent_avg


def load_style_encoder(path: str) -> StyleEncoder:
    """An official pSp or e4e checkpoint (`{'state_dict': {'encoder.*', 'decoder.*'}, 'opts', 'latent_avg'}`),
    weights_only; the kind comes from opts['encoder_type'] and the widths from the tensors."""
    obj = load_state(str(path))
    if not isinstance(obj, dict) or "state_dict" not in obj or "opts" not in obj:
        raise CheckpointError(f"{path}: expected a pSp/e4e checkpoint with 'state_dict' and 'opts', found "
                              f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__}")
    opts = obj["opts"]
    kind = opts.get("encoder_type", "GradualStyleEncoder")
    if kind not in ("GradualStyleEncoder", "Encoder4Editing"):
        raise CheckpointError(f"{path}: encoder_type {kind!r} is not supported (GradualStyleEncoder, Encoder4Editing)")
    sd = {k[len("encoder."):]: v for k, v in obj["state_dict"].items() if k.startswith("encoder.")}
    n_units = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    if n_units != sum(IRSE50_UNITS):
        raise CheckpointError(f"{path}: expected the IR-SE50 body ({sum(IRSE50_UNITS)} units), found {n_units}")
    starts = [0, 3, 7, 21]
    widths = [sd[f"body.{u}.res_layer.1.weight"].shape[0] for u in starts]
    n_styles = len({k.split(".")[1] for k in sd if k.startswith("styles.")})
    style_dim = sd["styles.0.linear.weight"].shape[0]
    latent_avg = obj.get("latent_avg") if opts.get("start_from_latent_avg", False) else None
    encoder = StyleEncoder(widths, style_dim, n_styles, delta_rows=kind == "Encoder4Editing", latent_avg=latent_avg,
                           input_size=int(opts.get("input_size", 256)))
    try:
        encoder.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: encoder weights do not fit a {kind}: {exc}") from None
    encoder.generator_id = opts.get("generator_id")  # set by encoders latentray trained
    return encoder.eval().requires_grad_(False)


def save_style_encoder(encoder: StyleEncoder, path, generator_id: str | None = None, extra: dict | None = None) -> None:
    """Write `encoder` in the official pSp/e4e layout (`state_dict` with `encoder.*` keys, `opts`, `latent_avg`),
    so load_style_encoder and the official loaders' key layout both read it; `opts` also records the input size
    and the generator it was trained for."""
    opts = {"encoder_type": "Encoder4Editing" if encoder.delta_rows else "GradualStyleEncoder",
            "start_from_latent_avg": encoder.latent_avg is not None, "input_size": encoder.input_size,
            "n_styles": encoder.n_styles, "generator_id": generator_id, **(extra or {})}
    state = {f"encoder.{k}": v.detach().cpu() for k, v in encoder.state_dict().items()}
    obj = {"state_dict": state, "opts": opts}
    if encoder.latent_avg is not None:
        obj["latent_avg"] = encoder.latent_avg.detach().cpu()
    torch.save(obj, path)

"""Image-to-image generators of junyanz/pytorch-CycleGAN-and-pix2pix with the upstream module layout, so official
`latest_net_G*.pth` state dicts load strictly (conventions: shared/reference/cyclegan/README.md, ../pix2pix/):
the CycleGAN ResNet generator and the pix2pix U-Net (`unet_128`, `unet_256`, any depth), instance or batch norm,
dropout on or off.

Test-time behaviour is explicit: `batch_stats=True` normalises BatchNorm with the statistics of the batch (what the
official test.py does without `--eval`: it runs one image per batch, so a row's output depends on that row only),
`dropout=True` keeps dropout active, its masks drawn from the generator given per call. Both off: eval mode, as
`test.py --eval`.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoints import CheckpointError, load_state


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d (same keys) that can normalise with the batch's own statistics without touching the stored
    running statistics."""

    batch_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_stats:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


class SeededDropout(nn.Module):
    """Dropout(0.5) that is active only when asked, with masks from an explicit torch.Generator (no global RNG)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p, self.active, self.generator = p, False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        keep = torch.rand(x.shape, generator=self.generator).to(x.device) >= self.p
        return x * keep / (1 - self.p)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind not in ("instance", "batch"):
        raise ValueError(f"norm must be instance or batch, got {kind!r}")
    return nn.InstanceNorm2d(channels) if kind == "instance" else BatchNorm(channels)


# ----- CycleGAN: ResNet generator --------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, dropout: bool):
        super().__init__()
        bias = norm == "instance"
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(norm, dim), nn.ReLU(True)]
        if dropout:  # shifts the second conv's key from conv_block.5 to conv_block.6, as upstream
            layers.append(SeededDropout())
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(norm, dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """Reflection pads, 7x7 convs in and out, two stride-2 convs down, n ResNet blocks, two transposed convs up,
    tanh. Instance norm has no affine parameters and no running stats, so every conv carries a bias; with batch
    norm the convs have none except the last."""

    kind = "resnet"

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, norm: str = "instance",
                 dropout: bool = False, n_blocks: int = 9):
        super().__init__()
        bias = norm == "instance"
        self.config = dict(in_channels=in_channels, out_channels=out_channels, ngf=ngf, norm=norm, dropout=dropout,
                           n_blocks=n_blocks)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=bias), norm_layer(norm, ngf),
                  nn.ReLU(True)]
        for i in range(2):  # down: ngf -> 2 ngf -> 4 ngf
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias), norm_layer(norm, 2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, norm, dropout) for _ in range(n_blocks)]
        for i in range(2):  # up: every side exactly doubled
            c = ngf * 4 // 2**i
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       norm_layer(norm, c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1], H and W multiples of 4 -> same size in [-1, 1]."""
        return self.model(x)


def resnet_config(state: dict) -> dict:
    blocks = sorted({int(k.split(".")[1]) for k in state if ".conv_block." in k})
    first = state["model.1.weight"]
    last = max(int(k.split(".")[1]) for k in state if k.endswith(".weight") and ".conv_block." not in k)
    return dict(in_channels=first.shape[1], out_channels=state[f"model.{last}.weight"].shape[0],
                ngf=first.shape[0], norm="batch" if "model.2.weight" in state else "instance",
                dropout=any(".conv_block.6.weight" in k for k in state), n_blocks=len(blocks))


# ----- pix2pix: U-Net generator ----------------------------------------------------------------------------------
class UnetBlock(nn.Module):
    """One level of upstream's UnetSkipConnectionBlock: down (LeakyReLU 0.2, 4x4 stride-2 conv, norm), the inner
    level, up (ReLU, 4x4 stride-2 transposed conv, norm; tanh at the outermost); every level but the outermost
    returns cat([input, output]). Module indices (and so state-dict keys) are upstream's."""

    def __init__(self, outer: int, inner: int, in_channels: int, submodule: nn.Module | None, norm: str,
                 outermost: bool = False, dropout: bool = False):
        super().__init__()
        bias = norm == "instance"
        down = nn.Conv2d(in_channels, inner, 4, stride=2, padding=1, bias=bias)
        if outermost:
            layers = [down, submodule, nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
        elif submodule is None:  # innermost
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(True), nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias),
                      norm_layer(norm, outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, norm_layer(norm, inner), submodule, nn.ReLU(True),
                      nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=bias), norm_layer(norm, outer)]
            if dropout:  # at the end of the list: no key shifts
                layers.append(SeededDropout())
        self.outermost = outermost
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """`widths` lists (outer, inner, input) channels per level, outermost first (upstream: ngf, 2 ngf, 4 ngf, then
    8 ngf down to the 1x1 bottleneck); dropout sits in the levels with `dropout_levels` (upstream: the num_downs-5
    levels directly above the innermost)."""

    kind = "unet"

    def __init__(self, widths: list[tuple[int, int, int]], norm: str = "batch", dropout_levels: tuple = ()):
        super().__init__()
        self.config = dict(widths=[list(w) for w in widths], norm=norm, dropout_levels=list(dropout_levels),
                           num_downs=len(widths))
        block = None
        for level in range(len(widths) - 1, -1, -1):
            outer, inner, in_channels = widths[level]
            block = UnetBlock(outer, inner, in_channels, block, norm, outermost=level == 0,
                              dropout=level in dropout_levels)
        self.model = block

    @classmethod
    def official(cls, in_channels: int = 3, out_channels: int = 3, num_downs: int = 8, ngf: int = 64,
                 norm: str = "batch", dropout: bool = False) -> "UnetGenerator":
        """Upstream's UnetGenerator(input_nc, output_nc, num_downs, ngf): unet_256 is num_downs 8, unet_128 7."""
        widths = [(out_channels, ngf, in_channels), (ngf, 2 * ngf, ngf), (2 * ngf, 4 * ngf, 2 * ngf),
                  (4 * ngf, 8 * ngf, 4 * ngf)] + [(8 * ngf, 8 * ngf, 8 * ngf)] * (num_downs - 4)
        return cls(widths, norm, tuple(range(4, num_downs - 1)) if dropout else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1], H and W multiples of 2**num_downs -> same size in [-1, 1]."""
        return self.model(x)


def unet_config(state: dict, dropout: bool) -> dict:
    """Levels read off the keys: the outermost conv is model.model.0, level i's conv sits under
    model.model.1(.model.3)*(i-1); a ConvTranspose weight is [in, out, k, k]."""
    widths = [(state["model.model.3.weight"].shape[1], *state["model.model.0.weight"].shape[:2])]
    prefix = "model.model.1"
    while f"{prefix}.model.1.weight" in state:
        conv = state[f"{prefix}.model.1.weight"]
        widths.append((conv.shape[1], conv.shape[0], conv.shape[1]))
        prefix += ".model.3"
    norm = "batch" if "model.model.1.model.2.running_mean" in state else "instance"
    innermost = len(widths) - 1
    dropout_levels = tuple(range(innermost - max(0, len(widths) - 5), innermost)) if dropout else ()
    return dict(widths=widths, norm=norm, dropout_levels=dropout_levels)


# ----- loading and running -----------------------------------------------------------------------------------------
def clean_state_dict(state: dict, net: nn.Module) -> dict:
    """Drop what upstream's load_networks drops: the running stats that InstanceNorm layers of released (pre-0.4)
    checkpoints carry; real BatchNorm statistics stay."""
    instance = {name for name, m in net.named_modules() if isinstance(m, nn.InstanceNorm2d)}
    return {k: v for k, v in state.items()
            if not (k.rsplit(".", 1)[0] in instance and k.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                                               "num_batches_tracked"))}


def load_translator(path: str, device: str | torch.device = "cpu", batch_stats: bool = False,
                    dropout: bool = False) -> nn.Module:
    """An official `<epoch>_net_G*.pth` (a bare state dict; ResNet or U-Net, told apart by its keys) -> a generator
    with frozen weights. Loaded with weights_only; a strict load names what is missing or unexpected."""
    state = load_state(str(path), what="a torch state dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a generator state dict (name -> tensor), found "
                              f"{type(state).__name__}")
    state = {k: v for k, v in state.items() if k != "_metadata"}
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers of forks
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if "model.1.weight" in state:
        net = ResnetGenerator(**resnet_config(state))
    elif "model.model.0.weight" in state:
        net = UnetGenerator(**unet_config(state, dropout))
    else:
        found = ", ".join(list(state)[:4])
        raise CheckpointError(f"{path}: neither a CycleGAN ResnetGenerator (model.1.weight, ...) nor a pix2pix "
                              f"UnetGenerator (model.model.0.weight, ...) state dict; found {found or 'no tensors'}")
    missing, unexpected = net.load_state_dict(clean_state_dict(state, net), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit a {net.kind} generator {net.config}: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    for m in net.modules():
        if isinstance(m, BatchNorm):
            m.batch_stats = batch_stats
        if isinstance(m, SeededDropout):
            m.active = dropout
    net.stochastic = batch_stats or dropout  # a row's output then depends on that row alone: run one at a time
    return net.to(device).eval().requires_grad_(False)


def translate(net: nn.Module, x: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Run the generator. With batch statistics or active dropout every image runs alone (one image per batch, as
    test.py), its dropout masks from its own generator, so its output never depends on the other rows."""
    if not getattr(net, "stochastic", False):
        return net(x)
    outputs = []
    for i, image in enumerate(x.split(1)):
        for m in net.modules():
            if isinstance(m, SeededDropout):
                m.generator = generators[i] if generators else None
        outputs.append(net(image))
    return torch.cat(outputs)

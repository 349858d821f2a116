"""CycleGAN ResNet generator with junyanz/pytorch-CycleGAN-and-pix2pix's module layout, so official
`latest_net_G_A.pth` state dicts load strictly (conventions: shared/reference/cyclegan/README.md).

All layers sit in one `nn.Sequential` named `model`: reflection pads, 7x7 convs in and out, two stride-2 convs
down, n ResNet blocks, two transposed convs up, tanh. Instance norm has no affine parameters and no running stats
(train and eval give the same output), so every conv carries a bias; with batch norm the convs have none except
the last.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.checkpoints import CheckpointError, read_bytes


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels) if kind == "instance" else nn.BatchNorm2d(channels)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, dropout: bool):
        super().__init__()
        bias = norm == "instance"
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), _norm(norm, dim), nn.ReLU(True)]
        if dropout:  # shifts the second conv's key from conv_block.5 to conv_block.6, as upstream
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), _norm(norm, dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, norm: str = "instance",
                 dropout: bool = False, n_blocks: int = 9):
        super().__init__()
        if norm not in ("instance", "batch"):
            raise ValueError(f"norm must be instance or batch, got {norm!r}")
        bias = norm == "instance"
        self.config = dict(in_channels=in_channels, out_channels=out_channels, ngf=ngf, norm=norm, dropout=dropout,
                           n_blocks=n_blocks)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=bias), _norm(norm, ngf), nn.ReLU(True)]
        for i in range(2):  # down: ngf -> 2 ngf -> 4 ngf
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias), _norm(norm, 2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, norm, dropout) for _ in range(n_blocks)]
        for i in range(2):  # up: every side exactly doubled
            c = ngf * 4 // 2**i
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       _norm(norm, c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1], H and W multiples of 4 -> same size in [-1, 1]."""
        return self.model(x)


def infer_config(state: dict) -> dict:
    """Architecture of a junyanz ResNet generator from its state-dict keys and shapes."""
    if "model.1.weight" not in state:
        found = ", ".join(list(state)[:4])
        raise CheckpointError(f"not a CycleGAN ResnetGenerator state dict: expected keys model.1.weight, "
                              f"model.4.weight, ...; found {found or 'no tensors'}")
    blocks = sorted({int(k.split(".")[1]) for k in state if ".conv_block." in k})
    first = state["model.1.weight"]
    last = max((int(k.split(".")[1]) for k in state if k.endswith(".weight") and ".conv_block." not in k))
    return dict(in_channels=first.shape[1], out_channels=state[f"model.{last}.weight"].shape[0],
                ngf=first.shape[0], norm="batch" if "model.2.weight" in state else "instance",
                dropout=any(".conv_block.6.weight" in k for k in state), n_blocks=len(blocks))


def clean_state_dict(state: dict, norm: str) -> dict:
    """Drop the InstanceNorm running stats that released (pre-0.4) checkpoints carry, as upstream load_networks
    does; batch-norm statistics are real and stay."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in state.items() if norm != "instance" or k.rsplit(".", 1)[-1] not in stats}


def load_cyclegan(path: str, device: str | torch.device = "cpu") -> ResnetGenerator:
    """An official `<epoch>_net_G[_A|_B].pth` (a bare state dict) -> eval-mode generator. Loaded with
    weights_only; the architecture is read off the keys; a strict load names what is missing or unexpected."""
    import io

    try:
        state = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read as a torch state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a CycleGAN generator state dict (name -> tensor), found "
                              f"{type(state).__name__}")
    state = {k: v for k, v in state.items() if k != "_metadata"}
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers of forks
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    config = infer_config(state)
    net = ResnetGenerator(**config)
    missing, unexpected = net.load_state_dict(clean_state_dict(state, config["norm"]), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit a ResnetGenerator {config}: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    return net.to(device).eval().requires_grad_(False)

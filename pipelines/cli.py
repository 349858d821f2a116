"""`latentray` command line. Thin: parses options, calls models/ops, prints a one-line summary."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

EPILOG = """examples:
  latentray invert --input photos/ --output out/latents --align none --spaces wplus,fwplus --steps 300
  latentray sample --output out/samples.png --n 16
  latentray convert --input network-snapshot-025000.pkl --output ffhq.latentray.pt
"""


def _load(generator: str | None):
    from models.checkpoints import load_generator
    from models.default_generator import DEFAULT_GENERATOR_PATH

    return load_generator(generator or str(DEFAULT_GENERATOR_PATH))


def cmd_sample(args) -> None:
    import torch
    from PIL import Image

    from ops.images import make_grid, to_uint8

    G = _load(args.generator)
    z = torch.randn(args.n, G.style_dim, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        w = G.mapping(z)
        if args.psi < 1:
            w = G.truncate(w, G.w_avg if G.w_avg is not None else G.mean_latent(10_000), args.psi)
        img = G.synthesis(w)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(to_uint8(img), ncols=math.ceil(math.sqrt(args.n)))).save(out)
    note = " (bundled default generator: random weights, not a face model)" if args.generator is None else ""
    print(f"wrote {args.n} samples of {G.size}x{G.size} from {G.source_format} generator "
          f"{G.generator_id[:12]} to {out}{note}")


def cmd_convert(args) -> None:
    from models.checkpoints import save_generator

    G = _load(args.input)
    save_generator(G, args.output)
    print(f"converted {G.source_format} generator {G.generator_id[:12]} ({G.size}px) to {args.output}")


def cmd_invert(args) -> None:
    from ops.invert_stage import InvertStageConfig
    from pipelines.invert import run_invert

    cfg = InvertStageConfig(generator=args.generator or "", spaces=tuple(args.spaces.split(",")), steps=args.steps,
                            lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone, base_level=args.base_level,
                            basecode_encoder=args.basecode_encoder or "", seed=args.seed, device=args.device,
                            optimize_noise=args.optimize_noise)
    stats = run_invert(args.input, args.output, cfg, align=args.align, batch_size=args.batch_size, limit=args.limit,
                       overwrite=args.overwrite)
    rate = stats["rows_processed"] / max(stats["seconds"], 1e-9)
    print(f"invert: {stats['by_status']} ({stats['already_done']} already done), {rate:.2f} rows/s, "
          f"errors {stats['by_error'] or 'none'}; outputs in {args.output}")


def cmd_export(args) -> None:
    from pipelines.io import export_latents

    n = export_latents(args.input, args.output, args.column)
    print(f"exported {n} ok rows of {args.column} from {args.input} to {args.output}")


def cmd_describe(args) -> None:
    import json

    from pipelines.io import read_dataset, read_json

    table = read_dataset(args.input, ["status", "error_code"])
    statuses = table.column("status").to_pylist() if len(table) else []
    run = read_json(args.input, "run.json") or {}
    print(json.dumps({"rows": len(statuses), "by_status": {s: statuses.count(s) for s in sorted(set(statuses))},
                      "fingerprint": run.get("fingerprint"), "config": run.get("config")}, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentray", epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="write a PNG grid of generator samples")
    p.add_argument("--generator", help="checkpoint (.pt rosinality/latentray, .pkl NVIDIA); default: bundled")
    p.add_argument("--output", required=True, help="PNG path")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="z seed (default 0)")
    p.add_argument("--psi", type=float, default=1.0, help="truncation psi (default 1: none)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("invert", help="ingest + align + invert images into latents (Parquet)")
    p.add_argument("--input", required=True, action="append", help="directory, glob, file or s3:// URI (repeatable)")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix")
    p.add_argument("--generator", help="checkpoint; default: the bundled generator (not a face model)")
    p.add_argument("--align", default="none", choices=["none"], help="alignment policy (default none)")
    p.add_argument("--spaces", default="wplus", help="comma list of w,wplus,s,fwplus (default wplus)")
    p.add_argument("--steps", type=int, help="optimisation steps (default: each space's recipe)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--limit", type=int, help="process only the first N inputs (the rest are rows with status skipped)")
    p.add_argument("--base-level", type=int, default=16, help="F/W+ base-code resolution (default 16)")
    p.add_argument("--basecode-encoder", help="BDInvert base-code encoder checkpoint for fwplus")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--lpips-backbone", default="imagenet", choices=["imagenet", "random"],
                   help="random = explicit offline opt-in, recorded in every row (not real LPIPS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimize-noise", action="store_true",
                   help="optimise per-image noise maps (not stored: the stored latent alone then reproduces less)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output with another configuration")
    p.set_defaults(func=cmd_invert)
    p = sub.add_parser("export", help="latents of a stage output to .npz or .pt for other tools")
    p.add_argument("--input", required=True, help="stage output directory")
    p.add_argument("--output", required=True, help="destination .npz or .pt")
    p.add_argument("--column", default="wplus", help="latent column (default wplus)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("describe", help="rows by status and the configuration of a stage output")
    p.add_argument("--input", required=True)
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("convert", help="convert a checkpoint to latentray's own format (no pickle path on reload)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.checkpoints import CheckpointError

    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"latentray: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`latentray` command line. Thin: parses options, calls models/ops, prints a one-line summary."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

EPILOG = """examples:
  latentray invert --input photos/ --output out/latents --generator stylegan2-ffhq-config-f.pt --spaces wplus,fwplus
  latentray invert --input s3://bucket/shifted/ --output s3://bucket/latents --align none --set steps=300
  latentray run pipeline.yaml
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


def _align(args):
    from ops.align import AlignConfig

    return AlignConfig(mode=args.align, strict_faces=args.strict_faces, transform_size=args.transform_size,
                       min_score=args.min_face_score)


def _summary(name: str, stats: dict, output: str) -> None:
    if stats.get("dry_run"):
        import json

        print(json.dumps(stats, indent=1, default=str))
        return
    print(f"{name}: {stats['by_status']} ({stats['already_done']} already done), {stats['rows_per_second']:.2f} "
          f"rows/s, errors {stats['by_error'] or 'none'}; outputs in {output}, previews in "
          f"{output.rstrip('/')}/previews")


def cmd_ingest(args) -> None:
    from pipelines.invert import run_invert

    size = args.size or (_load(args.generator).size if args.generator else None)
    stats = run_invert(args.input, args.output, None, align=_align(args), batch_size=args.batch_size,
                       limit=args.limit, overwrite=args.overwrite, size=size, dry_run=args.dry_run)
    _summary("ingest", stats, args.output)


def cmd_invert(args) -> None:
    from ops.invert_stage import InvertStageConfig
    from pipelines.invert import run_invert

    cfg = InvertStageConfig(generator=args.generator or "", spaces=tuple(args.spaces.split(",")), steps=args.steps,
                            lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone, base_level=args.base_level,
                            basecode_encoder=args.basecode_encoder or "", seed=args.seed, device=args.device,
                            optimize_noise=args.optimize_noise)
    stats = run_invert(args.input, args.output, cfg, align=_align(args), batch_size=args.batch_size,
                       limit=args.limit, overwrite=args.overwrite, actors=args.actors, dry_run=args.dry_run)
    _summary("invert", stats, args.output)


EDIT_EPILOG = """edits file (YAML list; `strengths` are rendered side by side; `name` defaults to the kind):
  - {kind: direction, name: smile, path: smile.npy, strengths: [-3, 0, 3], layers: [0, 8]}
  - {kind: channel, layer: convs.5, channel: 12, strengths: [-10, 0, 10]}   # alpha in channel stds
  - {kind: interpolate, other: photos/b.jpg, strengths: [0, 0.5, 1]}
  - {kind: arithmetic, a: neutral.jpg, b: smiling.jpg, strengths: [1]}      # + lambda (w_b - w_a)
  - {kind: mix, other: photos/b.jpg, strengths: [4, 8]}                     # rows [0, k) kept
  - {kind: geometric, shift: [16, 0], degrees: 10, strengths: [0, 1]}       # fwplus: transforms F
"""


def read_edits(path: str):
    import yaml

    from ops.edit import Edit

    with open(path) as f:
        entries = yaml.safe_load(f)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a YAML list of edits")
    edits = []
    for entry in entries:
        params = dict(entry)
        kind, name = params.pop("kind", None), str(params.pop("name", ""))
        strengths = tuple(float(v) for v in params.pop("strengths", [1.0]))
        edits.append(Edit(kind=kind, strengths=strengths, name=name, params=params))
    return edits


def cmd_edit(args) -> None:
    from pipelines.latents import run_edit

    if not args.edits:
        raise ValueError("--edits FILE is required")
    stats = run_edit(args.input[0], args.output, read_edits(args.edits), space=args.space,
                     generator=args.generator or "", batch_size=args.batch_size, overwrite=args.overwrite,
                     actors=args.actors, cache_dir=args.cache_dir, channel_stats=args.channel_stats)
    print(f"edit: {stats['by_status']} in {stats['seconds']:.1f} s; outputs in {args.output}, previews in "
          f"{args.output.rstrip('/')}/previews")


def cmd_channels(args) -> None:
    from pipelines.latents import run_channels

    exemplars = None
    if args.exemplars:
        with open(args.exemplars) as f:
            exemplars = [line.strip() for line in f if line.strip()]
    stats = run_channels(args.input[0], args.output, exemplars, args.exemplar_column, args.local_sample,
                         args.generator or "", args.batch_size, args.grid, args.top, args.overwrite, args.actors,
                         args.exemplar_filter, args.mask_column, args.mask_labels)
    print(f"channels: {stats}; outputs in {args.output}")


def _required(args, *names) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"{args.command} needs {', '.join(missing)}")


def cmd_destylize(args) -> None:
    from ops.align import AlignConfig
    from ops.destylize import DestylizeConfig
    from pipelines.style import run_destylize

    _required(args, "finetuned", "encoder")
    cfg = DestylizeConfig(steps=args.steps, id_weight=args.id_weight, truncation=args.truncation,
                          lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone, seed=args.seed)
    stats = run_destylize(args.input, args.output, args.finetuned, args.encoder, args.generator or "",
                          args.identity or "", cfg, AlignConfig(mode=args.align), args.device,
                          batch_size=args.batch_size, overwrite=args.overwrite, actors=args.actors)
    _summary("destylize", stats, args.output)


def cmd_stylize(args) -> None:
    from ops.align import AlignConfig
    from pipelines.style import run_stylize

    _required(args, "dualstylegan", "encoder", "exstyles")
    weights = [float(v) for v in args.weights.split(",")] if args.weights else None
    stats = run_stylize(args.input, args.output, args.dualstylegan, args.encoder, args.exstyles,
                        args.styles.split(","), weights, args.truncation, args.preserve_color,
                        AlignConfig(mode=args.align), args.device, batch_size=args.batch_size,
                        overwrite=args.overwrite, actors=args.actors)
    _summary("stylize", stats, args.output)


def cmd_translate(args) -> None:
    from pipelines.translate import run_translate

    if not args.cyclegan:
        raise ValueError("--cyclegan CHECKPOINT is required")
    stats = run_translate(args.input, args.output, args.cyclegan, args.column, args.preprocess, args.load_size,
                          args.batch_size, args.overwrite, args.actors, args.device)
    print(f"translate: {stats['by_status']} ({stats['already_done']} already done) in {stats['seconds']:.1f} s; "
          f"outputs in {args.output}, previews in {args.output.rstrip('/')}/previews")


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


def io_options(p, input_help: str, batch_size: int = 8) -> None:
    # --input/--output may also come from --config or --set (checked in resolve_args)
    p.add_argument("--input", action="append", help=input_help)
    p.add_argument("--output", help="output directory or s3:// prefix")
    p.add_argument("--config", help="YAML file of options (names as on this command line); flags given win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one option (repeatable)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"rows per batch (default {batch_size})")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output with another configuration")


def common_options(p) -> None:
    io_options(p, "directory, glob, file or s3:// URI (repeatable); for invert also an `ingest` output")
    p.add_argument("--limit", type=int, help="process only the first N inputs (the rest are rows with status skipped)")
    p.add_argument("--dry-run", action="store_true", help="print what would run (inputs, already done, to do) and stop")
    p.add_argument("--align", default="ffhq", choices=["ffhq", "none"],
                   help="ffhq: dlib 68-point landmarks -> FFHQ crop (default; the 68-point model is non-commercial);"
                        " none: centre square resized (out-of-range photos, BDInvert)")
    p.add_argument("--strict-faces", action="store_true",
                   help="a photo with several faces fails (multiple_faces) instead of aligning the best-scoring one")
    p.add_argument("--min-face-score", type=float, default=0.5, help="ignore detections scoring below (default 0.5)")
    p.add_argument("--transform-size", type=int,
                   help="FFHQ warp supersampling (default 4x the output; 4096 = FFHQ-exact, ~13x slower)")


def style_options(p, input_help: str) -> None:
    io_options(p, input_help, batch_size=4)
    p.add_argument("--encoder", help="Z+ pSp encoder (DualStyleGAN's encoder.pt)")
    p.add_argument("--align", default="ffhq", choices=["ffhq", "none"],
                   help="ffhq: detect + FFHQ crop (no face -> failed row); none: centre crop")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, else 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentray", epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stages = {}
    p = sub.add_parser("sample", help="write a PNG grid of generator samples")
    p.add_argument("--generator", help="checkpoint (.pt rosinality/latentray, .pkl NVIDIA); default: bundled")
    p.add_argument("--output", required=True, help="PNG path")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="z seed (default 0)")
    p.add_argument("--psi", type=float, default=1.0, help="truncation psi (default 1: none)")
    p.set_defaults(func=cmd_sample)
    p = stages["ingest"] = sub.add_parser("ingest", help="decode + align photos; pixels and geometry to Parquet",
                                          epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter)
    common_options(p)
    p.add_argument("--generator", help="checkpoint whose resolution sets the crop size (default: bundled)")
    p.add_argument("--size", type=int, help="crop size in pixels (default: the generator's resolution)")
    p.set_defaults(func=cmd_ingest)
    p = stages["invert"] = sub.add_parser("invert", help="ingest + align + invert images into latents (Parquet)",
                                          epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter)
    common_options(p)
    p.add_argument("--generator", help="checkpoint; default: the bundled generator (not a face model)")
    p.add_argument("--spaces", default="wplus", help="comma list of w,wplus,s,fwplus (default wplus)")
    p.add_argument("--steps", type=int, help="optimisation steps (default: each space's recipe)")
    p.add_argument("--base-level", type=int, default=16, help="F/W+ base-code resolution (default 16)")
    p.add_argument("--basecode-encoder", help="BDInvert base-code encoder checkpoint for fwplus")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--lpips-backbone", default="imagenet", choices=["imagenet", "random"],
                   help="random = explicit offline opt-in, recorded in every row (not real LPIPS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimize-noise", action="store_true",
                   help="optimise per-image noise maps (not stored: the stored latent alone then reproduces less)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, else 1)")
    p.set_defaults(func=cmd_invert)
    p = stages["edit"] = sub.add_parser("edit", help="apply latent edits to an invert output; render them",
                                        epilog=EDIT_EPILOG, formatter_class=argparse.RawTextHelpFormatter)
    io_options(p, "an invert output (directory or s3:// prefix)")
    p.add_argument("--edits", required=False, help="YAML list of edits (see below)")
    p.add_argument("--space", default="wplus", choices=["wplus", "s", "fwplus"], help="latents to edit (default wplus)")
    p.add_argument("--generator", help="checkpoint (default: the one recorded by invert; its id is checked)")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, else 1)")
    p.add_argument("--cache-dir", help="where to cache per-generator S statistics")
    p.add_argument("--channel-stats", help="a `channels` output whose population std scales channel edits "
                                           "(default: 10k samples of the generator, truncated 0.7)")
    p.set_defaults(func=cmd_edit)
    p = stages["channels"] = sub.add_parser("channels", help="StyleSpace channel statistics of an invert output")
    io_options(p, "an invert output holding S (space s) or W+ latents", batch_size=64)
    p.add_argument("--exemplars", help="file with one key per line: the attribute's exemplar rows")
    p.add_argument("--exemplar-column", help="boolean column of the input marking exemplar rows")
    p.add_argument("--exemplar-filter", help="exemplar rows by a condition on a column, e.g. \"smile > 0.5\"")
    p.add_argument("--local-sample", type=int, default=0,
                   help="images (ok rows with landmarks) for locally-active channels (default 0: skip)")
    p.add_argument("--mask-column", help="label-map column [H, W] for locally-active channels (default: masks "
                                         "from the stored face landmarks)")
    p.add_argument("--mask-labels", type=int, default=0, help="number of labels in --mask-column maps")
    p.add_argument("--grid", type=int, default=32, help="gradient-map resolution (default 32, as StyleSpace)")
    p.add_argument("--top", type=int, default=30, help="channels in the bar chart (default 30)")
    p.add_argument("--generator", help="checkpoint (default: the one recorded by invert)")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, else 1)")
    p.set_defaults(func=cmd_channels)
    p = stages["destylize"] = sub.add_parser("destylize", help="artistic portraits -> paired realistic faces "
                                                               "(DualStyleGAN destylization)")
    style_options(p, "portraits (dirs, globs, s3://)")
    p.add_argument("--finetuned", help="generator fine-tuned on the style (g'), rosinality .pt")
    p.add_argument("--generator", help="the original generator g (default: the bundled one)")
    p.add_argument("--identity", help="ArcFace IR-SE50 (model_ir_se50.pth); without it the ID term is off")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps (default 300)")
    p.add_argument("--id-weight", type=float, default=0.1)
    p.add_argument("--truncation", type=float, default=0.7, help="toward 0, for the realistic faces (default 0.7)")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--lpips-backbone", default="imagenet", choices=["imagenet", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_destylize)
    p = stages["stylize"] = sub.add_parser("stylize", help="DualStyleGAN exemplar style transfer onto faces")
    style_options(p, "face photos (dirs, globs, s3://)")
    p.add_argument("--dualstylegan", help="DualStyleGAN generator.pt")
    p.add_argument("--exstyles", help="exstyle_code.npy (or refined_exstyle_code.npy)")
    p.add_argument("--styles", default="0", help="comma list of exemplar names or positions (default 0)")
    p.add_argument("--weights", help="comma list, one per W+ row (default 0.75 x 7 structure, 1 x rest colour)")
    p.add_argument("--truncation", type=float, default=0.75, help="toward 0 (default 0.75)")
    p.add_argument("--preserve-color", action="store_true", help="keep the face's colours (rows 7- from it)")
    p.set_defaults(func=cmd_stylize)
    p = stages["translate"] = sub.add_parser("translate", help="CycleGAN translation of photos or a stage's images")
    io_options(p, "photos (dirs, globs, s3://) or one stage output (then --column names its image column)")
    p.add_argument("--cyclegan", help="junyanz generator checkpoint, e.g. latest_net_G_A.pth (A->B)")
    p.add_argument("--column", default="", help="image column of a stage output: aligned (ingest), image_png (edit)")
    p.add_argument("--preprocess", default="resize_and_crop", choices=["resize_and_crop", "none"],
                   help="official test pre-processing: squash to --load-size (default), or sides to multiples of 4")
    p.add_argument("--load-size", type=int, default=256, help="resize_and_crop size (default 256)")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, else 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=cmd_translate)
    p = sub.add_parser("run", help="run a YAML pipeline file: a list of stages with their options")
    p.add_argument("file", help="YAML: {stages: [{stage: ingest, input: ..., output: ..., ...}, {stage: invert, ...}]}")
    p.set_defaults(func=cmd_run)
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
    parser.set_defaults(stage_parsers=stages)
    return parser


CONTROL = {"config", "set", "func", "command", "stage_parsers"}


def apply_options(stage_parser, args, options: dict, explicit: set[str]) -> None:
    """Set options from a config file / --set / a pipeline file onto parsed args. Names as on the command line
    (dashes or underscores); unknown names and invalid values are errors; flags in `explicit` are kept."""
    actions = {a.dest: a for a in stage_parser._actions}
    for name, value in options.items():
        dest = str(name).replace("-", "_")
        if dest not in actions or dest in CONTROL or dest == "help":
            raise ValueError(f"unknown option {name!r} for `{args.command}` (see latentray {args.command} --help)")
        if dest in explicit:
            continue
        action = actions[dest]
        if dest == "input":
            value = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        elif action.type is not None and value is not None:
            value = action.type(value)
        if action.choices and value not in action.choices:
            raise ValueError(f"option {name!r}: {value!r} is not one of {sorted(action.choices)}")
        setattr(args, dest, value)


def given_flags(stage_parser, argv: list[str]) -> set[str]:
    """Dests of the options spelled out on the command line (they win over a --config file)."""
    flags = {s.split("=")[0] for s in argv if s.startswith("--")}
    return {a.dest for a in stage_parser._actions if flags & set(a.option_strings)}


def parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value) if value else ""
    return out


def resolve_args(parser, argv: list[str]):
    """Parse, then layer --config (below explicit flags) and --set (above everything)."""
    args = parser.parse_args(argv)
    stage_parser = args.stage_parsers.get(args.command)
    if stage_parser is None:
        return args
    if args.config:
        import yaml

        with open(args.config) as f:
            options = yaml.safe_load(f) or {}
        if not isinstance(options, dict):
            raise ValueError(f"{args.config} must hold a mapping of option names to values")
        apply_options(stage_parser, args, options, given_flags(stage_parser, argv))
    apply_options(stage_parser, args, parse_set(args.set), set())
    if not args.input or not args.output:
        raise ValueError("--input and --output are required (on the command line, in --config or via --set)")
    return args


def cmd_run(args) -> None:
    """Each stage of the file runs like its subcommand, in order; a failing stage stops the pipeline."""
    import yaml

    with open(args.file) as f:
        spec = yaml.safe_load(f) or {}
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{args.file}: expected `stages:` followed by a list of {{stage: name, option: value}}")
    parser = build_parser()
    for i, entry in enumerate(stages):
        options = dict(entry)
        name = options.pop("stage", None)
        if name not in args.stage_parsers:
            raise ValueError(f"{args.file}: stage {i}: `stage` must be one of {sorted(args.stage_parsers)}")
        stage_args = parser.parse_args([name])
        apply_options(stage_args.stage_parsers[name], stage_args, options, set())
        if not stage_args.input or not stage_args.output:
            raise ValueError(f"{args.file}: stage {i} ({name}) needs input and output")
        print(f"run: stage {i + 1}/{len(stages)}: {name} {stage_args.input} -> {stage_args.output}")
        stage_args.func(stage_args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    from models.checkpoints import CheckpointError

    try:
        args = resolve_args(parser, argv)
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"latentray: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

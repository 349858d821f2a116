"""`latentray` command line, generated from the stages: every stage of ops/ with a help line is a subcommand (it
registers itself by being defined), and every field of its Config (nested ones flattened), of its photo reader's
Config and of RunOptions is a flag and a `--set` key, its help the field's comment, its default the dataclass's.
Options layer as: defaults < `--config FILE` < flags on the command line < `--set key=value`; unknown names and bad
values are errors."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ops.ingest import PHOTO_READERS
from ops.redact import redact
from ops.stage import registered
from pipelines.driver import RunOptions

STAGES = registered()
EXIT_FOUND, EXIT_ERROR, EXIT_LOCKED = 1, 2, 3  # verify found damage; bad input or failure; output in use


# ----- options from dataclass fields ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    name: str  # the field name: flag --name-with-dashes, --set/--config key name or name-with-dashes
    path: tuple[str, ...]  # field names from the root Config down to this field
    root: str  # which Config: "stage", "photos" or "run"
    hint: Any  # the field's type
    default: Any
    help: str


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """Each field's comment: the one at the end of its line, else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    trailing = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if not t.line.lstrip().startswith("#")}
    own_line = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.line.lstrip().startswith("#")}
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = trailing.get(node.end_lineno)
            if text is None:
                above, line = [], node.lineno - 1
                while line in own_line:
                    above.insert(0, own_line[line])
                    line -= 1
                text = " ".join(above)
            out[node.target.id] = text
    return out


def config_options(cls, default, root: str, path: tuple[str, ...] = ()) -> list[Option]:
    """The leaf fields of a Config (nested dataclasses inlined); fields marked metadata cli=False are left out."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_options(hints[f.name], value, root, (*path, f.name))
        else:
            out.append(Option(f.name, (*path, f.name), root, hints[f.name], value, comments.get(f.name, "")))
    return out


def photos_config(stage) -> type | None:
    """The Config of the CPU stage that turns photos into this stage's rows (its fields are options too)."""
    return PHOTO_READERS[stage.photos][1] if stage.photos in PHOTO_READERS else None


@functools.lru_cache(maxsize=None)
def command_options(stage) -> tuple[Option, ...]:
    """Every option of a stage's subcommand: its Config's fields, its photo reader's, and the run options (computed
    once per stage)."""
    options = config_options(stage.Config, stage.Config(), "stage")
    reader = photos_config(stage)
    if reader is not None:
        options += config_options(reader, reader(), "photos")
    options += config_options(RunOptions, RunOptions(), "run")
    names = [o.name for o in options]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"{stage.name}: options {clashes} are declared twice")
    return tuple(options)


def is_optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def convert(hint, value, name: str):
    """A value from the command line (text) or from YAML (config file, --set) -> the field's type."""
    if is_optional(hint):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if str(value) not in args:
            raise ValueError(f"option {name!r}: {value!r} is not one of {sorted(args)}")
        return str(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text not in ("true", "false", "yes", "no", "1", "0"):
            raise ValueError(f"option {name!r}: {value!r} is not true or false")
        return text in ("true", "yes", "1")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        return tuple(convert(args[0], v.strip() if isinstance(v, str) else v, name) for v in items)
    if hint is dict or origin is dict:
        value = yaml_value(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError(f"option {name!r}: expected a mapping, got {value!r}")
        return dict(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ValueError(f"option {name!r}: expected a number, got {value!r}")
    try:
        return hint(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"option {name!r}: {exc}") from None


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text) if text else ""


def show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None or value == "" else str(value)


def add_option(parser, option: Option) -> None:
    flag = "--" + option.name.replace("_", "-")
    hint = option.hint if not is_optional(option.hint) else next(
        a for a in typing.get_args(option.hint) if a is not type(None))
    choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
    text = f"{option.help} ({'|'.join(choices) + '; ' if choices else ''}default {show(option.default)})"
    if hint is bool:
        parser.add_argument(flag, dest=option.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=text)
    else:
        parser.add_argument(flag, dest=option.name, default=argparse.SUPPRESS, metavar=option.name.upper(),
                            help=text)


def build_config(cls, default, options: list[Option], values: dict, root: str):
    """The Config with `values` set (nested fields through their path)."""
    def set_path(obj, path, value):
        if len(path) == 1:
            return dataclasses.replace(obj, **{path[0]: value})
        return dataclasses.replace(obj, **{path[0]: set_path(getattr(obj, path[0]), path[1:], value)})

    config = default
    for option in options:
        if option.root == root and option.name in values:
            config = set_path(config, option.path, values[option.name])
    return config


# ----- parser ----------------------------------------------------------------------------------------------------
def io_arguments(parser) -> None:
    parser.add_argument("--input", action="append", default=argparse.SUPPRESS,
                        help="photos (directory, glob, file, s3:// URI; repeatable) or one stage output")
    parser.add_argument("--output", default=argparse.SUPPRESS, help="output directory or s3:// prefix")
    parser.add_argument("--config", help="YAML file of options (names as on this command line); flags given win")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set one option, above flags and --config (repeatable)")


def stage_parser(sub, stage):
    examples = "examples:\n" + "\n".join(f"  {e}" for e in stage.examples)
    p = sub.add_parser(stage.name, help=stage.help, description=stage.help,
                       epilog=f"{examples}\n\n{stage.epilog}".rstrip(), formatter_class=argparse.RawTextHelpFormatter)
    io_arguments(p)
    for option in command_options(stage):
        add_option(p, option)
    p.set_defaults(func=cmd_stage, stage=stage)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentray", formatter_class=argparse.RawTextHelpFormatter,
                                     epilog="examples:\n" + "\n".join(
                                         f"  {s.examples[0]}" for s in STAGES.values() if s.examples))
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES.values():
        stage_parser(sub, stage)
    p = sub.add_parser("run", help="run a YAML pipeline file: a list of stages with their options (the whole chain "
                                   "is checked, column by column, before the first stage runs)")
    p.add_argument("file", help="YAML: {stages: [{stage: ingest, input: ..., output: ..., ...}, {stage: invert, ...}]}")
    p.add_argument("--dry-run", action="store_true", help="check the chain and say what each stage would do; run "
                                                           "nothing")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("sample", help="write a PNG grid of generator samples")
    p.add_argument("--generator", help="checkpoint (.pt rosinality/latentray, .pkl NVIDIA); default: bundled")
    p.add_argument("--output", required=True, help="PNG path")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="z seed (default 0)")
    p.add_argument("--psi", type=float, default=1.0, help="truncation psi (default 1: none)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("export", help="latents of a stage output to .npz or .pt for other tools")
    p.add_argument("--input", required=True, help="stage output directory")
    p.add_argument("--output", required=True, help="destination .npz or .pt")
    p.add_argument("--column", default="wplus", help="latent column (default wplus)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("describe", help="rows by status and the configuration of a stage output")
    p.add_argument("--input", required=True)
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("verify", help="read every file of an output whole: checksums, parsing, the index; "
                                      "quarantine what is damaged (exit 1 when anything was found)")
    p.add_argument("output_dir", metavar="OUT", help="stage output directory or s3:// prefix")
    p.add_argument("--no-repair", action="store_true", help="only report: quarantine nothing, take no lease")
    p.add_argument("--wait", action="store_true", help="wait while another run holds the output")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("compact", help="merge an output's small parts into parts of tens of MB (atomic; the index "
                                       "follows)")
    p.add_argument("output_dir", metavar="OUT", help="stage output directory or s3:// prefix")
    p.add_argument("--target-mb", type=float, default=32.0, help="size of the parts made (default 32)")
    p.add_argument("--wait", action="store_true", help="wait while another run holds the output")
    p.set_defaults(func=cmd_compact)
    p = sub.add_parser("report", help="write report.html for an output (also written at the end of every run): "
                                      "failures, metric histograms, worst/best rows, previews, run history")
    p.add_argument("output_dir", metavar="OUT", help="stage output directory or s3:// prefix")
    p.add_argument("--to", help="write the page into this directory instead of beside the output")
    p.add_argument("--gallery", type=int, default=12, help="worst and best rows shown per metric (default 12)")
    p.add_argument("--open", action="store_true", help="open the page in a browser (local pages only)")
    p.set_defaults(func=cmd_report)
    train_parser(sub)
    p = sub.add_parser("convert", help="convert a checkpoint to latentray's own format (no pickle path on reload)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("fetch-weights", help="download weight files (the LPIPS backbones by default) into the "
                                             "torch hub cache; needs internet, e.g. in a cluster's setup")
    p.add_argument("names", nargs="*", default=["vgg", "alex"],
                   help="vgg, alex, a torchvision file name or a URL (default: vgg alex)")
    p.add_argument("--base-url", help="fetch file names from this URL instead of download.pytorch.org")
    p.set_defaults(func=cmd_fetch_weights)
    return parser


@functools.lru_cache(maxsize=None)
def train_options() -> tuple[Option, ...]:
    from ops.train_encoder import EncoderTrainConfig
    from pipelines.train import TrainOptions

    return (*config_options(EncoderTrainConfig, EncoderTrainConfig(), "train"),
            *config_options(TrainOptions, TrainOptions(), "options"))


def train_parser(sub) -> None:
    help_ = "train a W+ encoder (e4e) or BDInvert's base-code encoder for a generator on Ray Train (DDP workers)"
    examples = ("latentray train-encoder --generator cars.pt --output s3://bucket/enc --workers 8 --steps 20000",
                "latentray invert --input photos/ --output out/lat --generator cars.pt --encoder out/enc/encoder.pt "
                "--steps 100")
    p = sub.add_parser("train-encoder", help=help_, description=help_, formatter_class=argparse.RawTextHelpFormatter,
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples) +
                       "\n\nThe same command after a kill goes on from the last checkpoint.")
    p.add_argument("--output", default=argparse.SUPPRESS, help="output directory or s3:// prefix")
    p.add_argument("--config", help="YAML file of options (names as on this command line); flags given win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set one option, above flags and --config (repeatable)")
    for option in train_options():
        add_option(p, option)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from ops.train_encoder import EncoderTrainConfig
    from pipelines.train import TrainOptions, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "set")}
    layers = ([read_yaml_mapping(args.config)] if args.config else []) + [given, parse_set(args.set)]
    listed = list(train_options())
    values = layered_values(listed, layers, "train-encoder")
    if not values.get("output") or "input" in values:
        raise ValueError("train-encoder takes --output (and no --input: it trains on the generator's samples and "
                         "--photos)")
    train(values["output"], build_config(EncoderTrainConfig, EncoderTrainConfig(), listed, values, "train"),
          build_config(TrainOptions, TrainOptions(), listed, values, "options"))


# ----- resolving a stage's options ------------------------------------------------------------------------------
def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml_value(value)
    return out


def stage_values(stage, layers: list[dict], command: str) -> dict:
    """Merge option layers (lowest first) into {option name: typed value}, plus `input` and `output`."""
    values = layered_values(command_options(stage), layers, command)
    if not values.get("input") or not values.get("output"):
        raise ValueError(f"{command} needs --input and --output (on the command line, in --config or via --set)")
    return values


def layered_values(listed, layers: list[dict], command: str) -> dict:
    """{option name: typed value} of option layers (lowest first), plus `input` and `output` when given; an unknown
    name is an error naming the command."""
    options = {o.name: o for o in listed}
    values = {}
    for layer in layers:
        for raw, value in layer.items():
            name = str(raw).replace("-", "_")
            if name in ("input", "output"):
                values[name] = ([str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]) \
                    if name == "input" else str(value)
            elif name in options:
                values[name] = convert(options[name].hint, value, raw)
            else:
                raise ValueError(f"unknown option {raw!r} for `{command}` (see latentray {command} --help)")
    return values


@dataclass
class Command:
    """One stage's run as the command line asks for it: the stage, its photo reader's Config, the run options."""

    stage: object
    photos: object
    options: RunOptions
    inputs: list[str]
    output: str

    @classmethod
    def of(cls, stage_cls, values: dict) -> "Command":
        options = command_options(stage_cls)
        reader = photos_config(stage_cls)
        return cls(stage_cls(build_config(stage_cls.Config, stage_cls.Config(), options, values, "stage")),
                   build_config(reader, reader(), options, values, "photos") if reader else None,
                   build_config(RunOptions, RunOptions(), options, values, "run"), values["input"], values["output"])

    def run(self, source=None) -> dict:
        from pipelines import driver, sources

        source = source or sources.source_for(self.stage, self.inputs)
        stats = driver.run_stage(driver.prepare(self.stage, source, self.photos), self.output, self.options)
        summary(self.stage.name, stats, self.output)
        return stats


def summary(name: str, stats: dict, output: str) -> None:
    """One line of plain words per run, e.g. `invert: 2 ok, 1 failed (no_face: 1) in 68 s — report: out/report.html`.
    """
    if stats.get("dry_run"):
        print(json.dumps(stats, indent=1, default=str))
        return
    print(f"{name}: {summary_line(stats)} in {stats['seconds']:.0f} s — " +
          (f"report: {stats['report']}" if stats.get("report") else f"output: {output}"))


def summary_line(stats: dict) -> str:
    if "by_status" not in stats:  # aggregates
        if stats.get("already_done"):
            return "nothing to do (its inputs have not changed)"
        return f"{stats.get('inputs', 0)} inputs reduced into {', '.join(stats.get('results', {})) or 'no table'}"
    by_status, by_error = stats["by_status"], stats["by_error"]
    words = []
    for status in ("ok", "failed", "skipped", *sorted(set(by_status) - {"ok", "failed", "skipped"})):
        if by_status.get(status):
            words.append(f"{by_status[status]} {status}")
    errors = ", ".join(f"{c}: {n}" for c, n in sorted(by_error.items(), key=lambda item: (-item[1], item[0])))
    line = ", ".join(words) or "no new rows"
    if errors:
        line += f" ({errors})"
    notes = []
    if stats.get("already_done"):
        notes.append(f"{stats['already_done']} inputs already done")
    if stats.get("redone"):
        notes.append(f"{stats['redone']} redone")
    if stats.get("changed"):
        notes.append(f"{stats['changed']} changed inputs redone")
    if stats.get("missing_inputs"):
        notes.append(f"{stats['missing_inputs']} rows kept of inputs now missing")
    if stats.get("quarantined"):
        notes.append(f"{len(stats['quarantined'])} damaged file(s) quarantined")
    return line + (f"; {', '.join(notes)}" if notes else "")


def cmd_stage(args) -> None:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "stage", "command", "config", "set")}
    layers = [read_yaml_mapping(args.config)] if args.config else []
    Command.of(args.stage, stage_values(args.stage, [*layers, given, parse_set(args.set)], args.command)).run()


def read_yaml_mapping(path: str) -> dict:
    import yaml

    with open(path) as f:
        options = yaml.safe_load(f) or {}
    if not isinstance(options, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    return options


def cmd_run(args) -> None:
    """Every stage's options, then the whole chain column by column, are checked before the first stage runs (a
    stage reading the output of an earlier one that has not run yet is checked against the columns it will have);
    then each stage runs like its subcommand, in order; a failing stage stops the pipeline."""
    from ops.stage import config_dict
    from pipelines import driver, sources

    spec = read_yaml_mapping(args.file)
    entries = spec.get("stages")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{args.file}: expected `stages:` followed by a list of {{stage: name, option: value}}")
    commands = []
    for i, entry in enumerate(entries):
        options = dict(entry)
        name = options.pop("stage", None)
        if name not in STAGES:
            raise ValueError(f"{args.file}: stage {i}: `stage` must be one of {sorted(STAGES)}")
        commands.append(Command.of(STAGES[name], stage_values(STAGES[name], [options], name)))
    planned: dict[str, sources.Planned] = {}
    for i, command in enumerate(commands):
        single = command.inputs[0] if len(command.inputs) == 1 else None
        source = planned[single] if single in planned and not sources.is_stage_output(single) else \
            sources.source_for(command.stage, command.inputs)
        try:
            bound = driver.prepare(command.stage, source, command.photos)
        except ValueError as exc:
            raise ValueError(f"{args.file}: stage {i} ({command.stage.name}): {exc}") from None
        upstream = {"stage": command.stage.name, "metadata": bound.plan.metadata,
                    "config": config_dict(command.stage.config)}
        planned[command.output] = sources.Planned(command.output, upstream, sources.predicted_columns(
            source, bound.plan, bound.reader_plan))
        if args.dry_run:
            print(f"run: stage {i + 1}/{len(commands)}: {command.stage.name} {command.inputs} -> {command.output}: "
                  f"inputs checked ({len(bound.plan.inputs or ())} columns), "
                  f"{len(bound.plan.outputs)} columns added")
    if args.dry_run:
        return
    for i, command in enumerate(commands):
        print(f"run: stage {i + 1}/{len(commands)}: {command.stage.name} {command.inputs} -> {command.output}")
        command.run()


# ----- other commands ----------------------------------------------------------------------------------------------
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


def cmd_export(args) -> None:
    from pipelines.export import export_latents

    n = export_latents(args.input, args.output, args.column)
    print(f"exported {n} ok rows of {args.column} from {args.input} to {args.output}")


def cmd_describe(args) -> None:
    from pipelines import index, io

    state = index.load(args.input)
    statuses = state.winners.column("status").to_pylist()
    run = io.read_json(args.input, "run.json") or {}
    print(json.dumps({"rows": len(statuses), "by_status": {s: statuses.count(s) for s in sorted(set(statuses))},
                      "parts": len(state.parts), "damaged": [p for p, _ in state.damaged],
                      "stage": run.get("stage"), "fingerprint": run.get("fingerprint"),
                      "schema_version": run.get("schema_version", 1), "config": run.get("config"),
                      "runs": len(run.get("runs", []))}, indent=1, default=str))


def cmd_verify(args) -> int:
    """Read every file of an output whole; quarantine what is damaged (holding the output's lease)."""
    from pipelines import index
    from pipelines.lock import OutputLock
    from pipelines.sources import is_stage_output

    if not is_stage_output(args.output_dir):
        raise ValueError(f"{args.output_dir} is not a latentray stage output (no run.json)")
    if args.no_repair:
        report = index.verify(args.output_dir, repair=False)
    else:
        with OutputLock(args.output_dir, wait=args.wait) as lock:
            report = index.verify(args.output_dir, repair=True, gen=lock.gen, fence=lock.check)
    print(json.dumps(report, indent=1, default=str))
    where = f"{args.output_dir}: {report['parts']} parts, {report['rows']} rows"
    if report["clean"]:
        print(f"verify: {where}: clean")
        return 0
    print(f"verify: {where}: {len(report['damaged'])} damaged file(s) ({len(report['quarantined'])} quarantined), "
          f"{len(report['index_mismatches'])} index mismatch(es), {report['duplicate_keys']} duplicate copies, "
          f"{len(report['stale_parts'])} stale part(s); rerun the stage to redo the rows of quarantined parts",
          file=sys.stderr)
    return EXIT_FOUND


def cmd_compact(args) -> None:
    """Merge an output's small parts into parts of about --target-mb, atomically, and consolidate its index."""
    from pipelines import index, io
    from pipelines.lock import OutputLock
    from pipelines.sources import is_stage_output

    if not is_stage_output(args.output_dir):
        raise ValueError(f"{args.output_dir} is not a latentray stage output (no run.json)")
    with OutputLock(args.output_dir, wait=args.wait) as lock:
        run = io.read_json(args.output_dir, "run.json") or {}
        state = index.load(args.output_dir, repair=True, fingerprint=run.get("fingerprint"))
        counts = index.tidy(args.output_dir, state, lock.gen, lock.check, target=int(args.target_mb * 2**20))
    print(f"compact: {args.output_dir}: {counts['parts_before']} parts -> {counts['parts_after']}")


def cmd_report(args) -> None:
    from pipelines import io, report

    io.refuse_credentials(args.output_dir, "OUT")
    if args.gallery < 0:
        raise ValueError(f"--gallery must be 0 or more, got {args.gallery}")
    where = report.write(args.output_dir, args.to, args.gallery)
    print(f"report: {where}")
    if args.open:
        if not io.is_local(where):
            raise ValueError(f"--open: {where} is not a local file; pass --to DIR to write it here")
        import webbrowser
        from pathlib import Path

        webbrowser.open(Path(where).resolve().as_uri())


def cmd_fetch_weights(args) -> None:
    from models.perceptual import fetch_weights

    for name in args.names:
        print(f"fetch-weights: {name} -> {fetch_weights(name, args.base_url)}")


class Redacting:
    """A text stream that masks credentials in everything written to it (our messages and the worker output Ray
    forwards to the driver)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def native_stderr_to_log():
    """Lines native code writes straight to file descriptor 2 (Ray's core worker) go to the driver log, while
    Python's sys.stderr (our messages) keeps the terminal. Yields the log's path (None when stderr is no file)."""
    try:
        if sys.stderr.fileno() != 2:
            raise OSError
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        yield None
        return
    from pipelines.runtime import driver_log_path

    path = driver_log_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    original = sys.stderr
    original.flush()
    terminal = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = open(terminal, "w", buffering=1, encoding=original.encoding, errors="backslashreplace",
                      closefd=False)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        os.close(terminal)
        sys.stderr = original


def main(argv: list[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    with native_stderr_to_log() as log:
        sys.stdout, sys.stderr = Redacting(sys.stdout), Redacting(sys.stderr)
        try:
            code = run_command(argv)
            if code and log and os.path.getsize(log):
                print(f"latentray: Ray's own log lines of this run: {log}", file=sys.stderr)
            return code
        finally:
            sys.stdout, sys.stderr = streams[0], sys.stderr.stream


def run_command(argv: list[str] | None) -> int:
    from models.checkpoints import CheckpointError
    from pipelines.io import StorageError
    from pipelines.lock import LeaseLost, OutputLocked
    from pipelines.runtime import StageFailed

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
    except (OutputLocked, LeaseLost) as exc:
        print(f"latentray: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (CheckpointError, ValueError, FileNotFoundError, StorageError, StageFailed) as exc:
        print(f"latentray: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

"""The CLI generated from the stage Configs: every field is a flag and a --set key with its comment as help and its
dataclass default; precedence defaults < --config < flags < --set; validation (no Ray)."""

import dataclasses

import pytest

from conftest import ENV, REPO
from ops.invert import InvertConfig
from ops.invert_stage import InvertStageConfig
from pipelines import cli
from pipelines.cli import STAGES, Command, build_parser, command_options, main, photos_config, stage_values
from pipelines.driver import RunOptions


def resolve(argv):
    """What `latentray <argv>` would run: (stage config, photos config, run options, values)."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in ("func", "stage", "command", "config", "set")}
    layers = [cli.read_yaml_mapping(args.config)] if args.config else []
    values = stage_values(args.stage, [*layers, given, cli.parse_set(args.set)], args.command)
    command = Command.of(args.stage, values)
    return command.stage.config, command.photos, command.options, values


def test_every_config_field_is_an_option_of_its_command():
    """Nothing can be set in Python that the command line cannot: each leaf field of each stage's Config (nested
    ones included) and of RunOptions is an option, once, with a help text."""
    def leaves(cls, default):
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(type(value), value)
            elif f.metadata.get("cli", True):
                yield f.name

    for name, stage in STAGES.items():
        options = {o.name: o for o in command_options(stage)}
        expected = set(leaves(stage.Config, stage.Config())) | set(leaves(RunOptions, RunOptions()))
        if photos_config(stage):
            expected |= set(leaves(photos_config(stage), photos_config(stage)()))
        assert set(options) == expected, name
        assert all(o.help for o in options.values()), [o.name for o in options.values() if not o.help]
    invert = {o.name: o for o in command_options(STAGES["invert"])}
    assert {"lpips_weight", "f_weight", "pnorm_weight", "noise_weight", "align", "retry_failed"} <= set(invert)
    assert "space" not in invert  # set per space by the stage, not an option
    assert invert["optimize_noise"].default is False  # the stage's own default for the nested recipe


def test_defaults_come_from_the_dataclasses_and_help_from_their_comments():
    stage, photos, run, _ = resolve(["invert", "--input", "a", "--output", "b"])
    assert stage == InvertStageConfig() and run == RunOptions()
    assert photos.alignment.align == "ffhq"
    text = build_parser()._subparsers._group_actions[0].choices["invert"].format_help()
    assert "weight of LPIPS at <= 256 px (0: LPIPS off, no backbone needed)" in text
    assert "(auto|cpu|cuda; default auto)" in text and "examples:" in text


def test_config_file_sits_below_flags_and_set_above_everything(tmp_path):
    cfg = tmp_path / "invert.yaml"
    cfg.write_text("input: [photos/]\noutput: out/x\nsteps: 50\nbatch-size: 4\nalign: none\nspaces: wplus,s\n"
                   "f_weight: 0.5\n")
    stage, photos, run, values = resolve(["invert", "--config", str(cfg), "--steps", "7", "--set", "batch_size=2",
                                          "--set", "strict-faces=true", "--set", "lpips_weight=0",
                                          "--mse-weight", "1"])
    assert values["input"] == ["photos/"] and values["output"] == "out/x"
    assert (stage.invert.steps, run.batch_size, photos.alignment.align, stage.spaces) == (7, 2, "none",
                                                                                         ("wplus", "s"))
    assert photos.alignment.strict_faces is True
    assert (stage.invert.lpips_weight, stage.invert.mse_weight, stage.invert.f_weight) == (0.0, 1.0, 0.5)
    stage, _, run, _ = resolve(["invert", "--input", "a", "--output", "b", "--steps", "3", "--set", "steps=9",
                                "--no-progress", "--set", "resources={pin: 1}"])
    assert stage.invert.steps == 9 and run.progress is False and run.resources == {"pin": 1}


@pytest.mark.parametrize("bad,match", [(["--set", "stepz=3"], "unknown option 'stepz'"),
                                        (["--set", "align=mtcnn"], "not one of"),
                                        (["--set", "steps=many"], "invalid literal"),
                                        (["--set", "steps"], "key=value"),
                                        (["--set", "overwrite=maybe"], "true or false")])
def test_bad_options_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve(["invert", "--input", "a", "--output", "b", *bad])


def test_required_options_are_checked_one_way(tmp_path, capsys):
    assert main(["invert", "--output", "b"]) == 2
    assert "invert needs --input and --output" in capsys.readouterr().err
    assert main(["destylize", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "destylize needs --finetuned, --encoder" in capsys.readouterr().err
    assert main(["edit", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "edit needs --edits" in capsys.readouterr().err


def test_cli_reports_option_errors_without_a_traceback(tmp_path, capsys):
    assert main(["invert", "--input", "a", "--output", "b", "--set", "nope=1"]) == 2
    assert "unknown option 'nope'" in capsys.readouterr().err
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("stages:\n  - stage: paint\n    input: a\n    output: b\n")
    assert main(["run", str(pipeline)]) == 2
    assert "stage 0: `stage` must be one of" in capsys.readouterr().err
    # every stage of a run file is checked before the first one runs
    pipeline.write_text(f"stages:\n  - {{stage: ingest, input: {tmp_path}, output: {tmp_path / 'o'}}}\n"
                        "  - {stage: invert, input: x, output: y, stepz: 3}\n")
    assert main(["run", str(pipeline)]) == 2
    assert "unknown option 'stepz' for `invert`" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_model_stages_declare_gpus_and_scale_with_the_cluster(monkeypatch):
    """GPU actors declare one GPU each and scale from 1 to what the cluster has or its autoscaler can add (also
    when it has none yet: that demand is what makes it add GPU nodes); --device cpu gives CPU actors."""
    from ops.stage import Plan, Resources
    from pipelines import runtime

    plan = Plan(resources=Resources(num_cpus=1, num_gpus=1))  # what every model stage declares
    monkeypatch.setattr(runtime, "cpu_actor_threads", lambda actors: 7)
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: (0, 8))  # autoscaling cluster, no GPU node yet
    args, device = runtime.actor_pool(plan)
    assert (args["compute"].min_size, args["compute"].max_size, args["num_gpus"], device) == (1, 8, 1, "auto")
    assert args["max_restarts"] == runtime.RETRIES
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: (0, 0))  # no GPUs anywhere
    args, device = runtime.actor_pool(plan)
    assert "num_gpus" not in args and device == "cpu" and args["compute"].max_size == 1 and args["num_cpus"] == 7
    assert args["compute"].enable_true_multi_threading  # calls on the actor's main thread (see runtime.pool)
    args, device = runtime.actor_pool(plan, "cuda", actors=3, resources={"pin": 1})
    assert (args["num_gpus"], args["compute"].max_size, args["resources"], device) == (1, 3, {"pin": 1}, "auto")
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: (2, 2))
    assert "num_gpus" not in runtime.actor_pool(plan, "cpu")[0]


def test_a_local_output_is_refused_on_a_cluster_spanning_hosts(monkeypatch, tmp_path):
    import ray

    from pipelines import driver, runtime

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.0.0.1"},
                                               {"Alive": True, "NodeManagerAddress": "10.0.0.2"}])
    monkeypatch.setattr(runtime, "can_add_nodes", lambda: False)
    with pytest.raises(ValueError, match="local path"):
        driver.check_output_location(str(tmp_path), RunOptions())
    driver.check_output_location("s3://bucket/out", RunOptions())
    driver.check_output_location(str(tmp_path), RunOptions(shared_output=True))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}] * 2)
    driver.check_output_location(str(tmp_path), RunOptions())  # several nodes, one host (one disk)
    monkeypatch.setattr(runtime, "can_add_nodes", lambda: True)  # an autoscaler may add hosts later
    with pytest.raises(ValueError, match="local path"):
        driver.check_output_location(str(tmp_path), RunOptions())


def test_invert_recipe_fields_reach_the_engine():
    stage, _, _, _ = resolve(["invert", "--input", "a", "--output", "b", "--set", "f_weight=0.01",
                              "--spaces", "fwplus", "--lr", "0.05"])
    resolved = dataclasses.replace(stage.invert, space="fwplus").resolved()
    assert (resolved.f_weight, resolved.lr, resolved.steps, resolved.optimize_noise) == (0.01, 0.05, 1200, False)
    assert InvertConfig().optimize_noise is None  # the engine keeps the space's recipe


def test_cpu_actors_share_the_cores_and_leave_a_cpu_for_the_tasks(monkeypatch):
    import os

    import ray

    from pipelines import runtime

    def nodes(*specs):
        return lambda: [{"Alive": True, "NodeManagerAddress": host, "Resources": {"CPU": cpus}} for host, cpus in specs]

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(ray, "nodes", nodes(("h", 16)))  # local Ray over-commits: 16 logical on 8 cores
    assert [runtime.cpu_actor_threads(a) for a in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setattr(ray, "nodes", nodes(("h", 4)))
    assert runtime.cpu_actor_threads(1) == 3  # never all the logical CPUs: the tasks need one
    monkeypatch.setattr(ray, "nodes", nodes(("a", 32), ("b", 8)))  # a cluster: the smallest node decides
    assert runtime.cpu_actor_threads(1) == 7 and runtime.cpu_actor_threads(2) == 3


def test_a_pipeline_file_is_checked_column_by_column_before_any_stage_runs(tmp_path, capsys):
    """`latentray run FILE` (and --dry-run) prepares every stage against what the earlier ones will write: a stage
    reading a column the chain will not have is refused before the first stage runs, naming stage and column."""
    photos = tmp_path / "photos"
    photos.mkdir()
    pipeline = tmp_path / "p.yaml"
    good = (f"stages:\n  - {{stage: ingest, input: {photos}, output: {tmp_path / 'a'}, align: none}}\n"
            f"  - {{stage: invert, input: {tmp_path / 'a'}, output: {tmp_path / 'l'}, lpips-backbone: random}}\n"
            f"  - {{stage: thumbnails, input: {tmp_path / 'a'}, output: {tmp_path / 't'}}}\n")
    pipeline.write_text(good)
    assert main(["run", str(pipeline), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("inputs checked") == 3 and not (tmp_path / "a").exists()
    pipeline.write_text(good + f"  - {{stage: thumbnails, input: {tmp_path / 'l'}, output: {tmp_path / 'u'}, "
                               "column: image_png}\n")
    assert main(["run", str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert "stage 3 (thumbnails)" in err and "has no column `image_png`" in err
    assert not (tmp_path / "a").exists()  # refused before the first stage ran
    pipeline.write_text(good + f"  - {{stage: edit, input: {tmp_path / 'l'}, output: {tmp_path / 'e'}, "
                               f"edits: {tmp_path / 'edits.yaml'}, space: fwplus}}\n")
    (tmp_path / "edits.yaml").write_text("- {kind: mix, other: x.png, strengths: [4]}\n")
    assert main(["run", str(pipeline), "--dry-run"]) == 2
    assert "stage 3 (edit): the input holds spaces ['wplus'], not fwplus" in capsys.readouterr().err


def test_an_input_missing_a_row_column_is_a_clear_error_not_a_failure_inside_ray(tmp_path, capsys):
    import pyarrow.parquet as pq

    from pipelines import io as storage
    from conftest import write_samples

    write_samples(tmp_path / "photos", 1)
    up = tmp_path / "aligned"
    assert main(["ingest", "--input", str(tmp_path / "photos"), "--output", str(up), "--align", "none"]) == 0
    part = next(up.glob("part-*.parquet"))
    table = pq.read_table(part)
    part.unlink()
    storage.write_named(str(up), "", 1, storage.table_bytes(table.drop_columns(["error_code"])))
    capsys.readouterr()
    assert main(["invert", "--input", str(up), "--output", str(tmp_path / "l"), "--lpips-backbone", "random"]) == 2
    err = capsys.readouterr().err
    assert f"invert: the input {up} has no `error_code` column" in err and "Traceback" not in err


def test_a_missing_golden_folder_fails_in_ci_and_skips_elsewhere(tmp_path):
    """Goldens never go quietly untested: without ../shared/reference, CI=true turns the skip into a failure."""
    import subprocess
    import sys

    test = "tests/test_stylegan2_goldens.py::test_rosinality_mapping_and_mean_latent"
    outcomes = {}
    for ci in ("", "true"):
        env = {**ENV, "CI": ci, "LATENTRAY_REFERENCE": str(tmp_path / "absent")}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", test], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        outcomes[ci] = (done.returncode, done.stdout)
    assert outcomes[""][0] == 0 and "1 skipped" in outcomes[""][1]
    assert outcomes["true"][0] == 1 and "CI=true: a missing golden is a failure" in outcomes["true"][1]


def test_a_stage_over_an_output_with_no_rows_yet_is_refused_clearly(tmp_path, capsys):
    """An upstream run killed before its first part (run.json, no part): refused naming the input, before any work
    (found by the torture test, seed 16: it used to say the input had no `key` column)."""
    from pipelines import io

    from models.default_generator import load_default_generator

    meta = {"generator": "", "generator_id": load_default_generator().generator_id, "spaces": ["wplus"],
            "base_level": 16}
    io.write_json(str(tmp_path / "lat"), "run.json", {"stage": "invert", "fingerprint": "0" * 16, "metadata": meta})
    assert main(["channels", "--input", str(tmp_path / "lat"), "--output", str(tmp_path / "ch")]) == 2
    err = capsys.readouterr().err
    assert f"channels: the input {tmp_path / 'lat'} holds no rows yet" in err and not (tmp_path / "ch").exists()

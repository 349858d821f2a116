"""Options from --config files, --set and pipeline files: precedence, names, validation (no Ray)."""

import pytest

from pipelines.cli import build_parser, main, resolve_args


def test_config_file_sits_below_flags_and_set_above_everything(tmp_path):
    cfg = tmp_path / "invert.yaml"
    cfg.write_text("input: [photos/]\noutput: out/x\nsteps: 50\nbatch-size: 4\nalign: none\nspaces: wplus,s\n")
    args = resolve_args(build_parser(), ["invert", "--config", str(cfg), "--steps", "7", "--set", "batch_size=2",
                                         "--set", "strict-faces=true"])
    assert args.input == ["photos/"] and args.output == "out/x"
    assert (args.steps, args.batch_size, args.align, args.spaces, args.strict_faces) == (7, 2, "none", "wplus,s", True)


@pytest.mark.parametrize("bad,match", [(["--set", "stepz=3"], "unknown option 'stepz'"),
                                        (["--set", "align=mtcnn"], "not one of"),
                                        (["--set", "steps=many"], "invalid literal"),
                                        (["--set", "steps"], "key=value")])
def test_bad_options_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_args(build_parser(), ["invert", "--input", "a", "--output", "b", *bad])


def test_cli_reports_option_errors_without_a_traceback(tmp_path, capsys):
    assert main(["invert", "--input", "a", "--output", "b", "--set", "nope=1"]) == 2
    assert "unknown option 'nope'" in capsys.readouterr().err
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("stages:\n  - stage: paint\n    input: a\n    output: b\n")
    assert main(["run", str(pipeline)]) == 2
    assert "stage 0: `stage` must be one of" in capsys.readouterr().err


def test_model_stages_take_one_actor_per_gpu_when_the_cluster_has_gpus(monkeypatch):
    import ray

    from pipelines.invert import RETRIES, actor_pool

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    pool = actor_pool(None)
    assert (pool["compute"].min_size, pool["num_gpus"], pool["max_restarts"]) == (2, 1, RETRIES)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    pool = actor_pool(None)
    assert pool["compute"].min_size == 1 and "num_gpus" not in pool and pool["num_cpus"] == 0.5
    assert actor_pool(3)["compute"].max_size == 3

"""The stage contract (ops/stage.py) without Ray: a plan is a value prepare returns without changing the stage;
process keeps rows and order, blanks what it did not compute as the plan declares, never overwrites a first failure,
fails rows (never the job), halves on out-of-memory; fan-out; registration; column checks of a chain."""

from dataclasses import dataclass

import numpy as np
import pytest

from ops.stage import REGISTRY, Column, Context, Plan, Stage, objects, registered
from pipelines import sources


@dataclass(frozen=True)
class ScaleConfig:
    factor: float = 2.0  # multiplies x


class Scale(Stage):
    name = "scale_test"
    Config = ScaleConfig
    calls: list = []

    def prepare(self, context):
        return Plan(inputs=(Column("x", "float64"),),
                    outputs=(Column("y", "float64"), Column("v", "float32", (2, 3)), Column("label", "str"),
                             Column("count", "int64", fill=-1), Column("png", "bytes")))

    def compute(self, batch):
        self.calls.append(len(batch["key"]))
        x = np.asarray(batch["x"], float)
        if (x < 0).any():
            raise RuntimeError("CUDA out of memory") if (x == -1).any() else ValueError("negative x")
        n = len(x)
        codes = objects(["bad_x" if v == 13 else "" for v in x])
        return {"y": x * self.config.factor, "v": np.ones((n, 2, 3), np.float32), "label": objects(["ok"] * n),
                "count": np.arange(n), "png": objects([b"p"] * n), "error_code": codes,
                "error": objects(["x is 13" if c else "" for c in codes])}


def batch(xs, failed=()):
    n = len(xs)
    out = {"key": objects([f"k{i}" for i in range(n)]), "status": objects(["ok"] * n),
           "error_code": objects([""] * n), "error": objects([""] * n), "x": np.asarray(xs, float)}
    for i in failed:
        out["status"][i], out["error_code"][i], out["error"][i] = "failed", "decode_error", "broken upstream"
    return out


def test_prepare_returns_a_plan_and_changes_nothing_of_the_stage():
    from ops.invert_stage import InvertStage, InvertStageConfig
    from ops.invert import InvertConfig

    for stage in (Scale(), InvertStage(InvertStageConfig(invert=InvertConfig(lpips_weight=0, mse_weight=1)))):
        before = dict(vars(stage))
        plan = stage.prepare(Context())
        assert isinstance(plan, Plan) and vars(stage) == before
        with pytest.raises(AttributeError):  # frozen: the runtime reads it, nobody changes it
            plan.batch_size = 1


def test_rows_keep_their_order_failed_rows_pass_untouched_and_blanks_follow_the_plan():
    out = Scale().ready().process(batch([1, 2, 3], failed=[1]))
    assert list(out["key"]) == ["k0", "k1", "k2"] and list(out["status"]) == ["ok", "failed", "ok"]
    assert out["error"][1] == "broken upstream" and np.array_equal(out["y"][[0, 2]], [2.0, 6.0])
    assert np.isnan(out["y"][1]) and np.isnan(out["v"][1]).all() and out["v"].shape == (3, 2, 3)
    assert out["label"][1] == "" and out["count"][1] == -1 and out["png"][1] == b""


def test_a_row_failure_keeps_the_first_failure_and_blanks_only_that_row():
    out = Scale().ready().process(batch([13, 2]))
    assert (out["status"][0], out["error_code"][0], out["error"][0]) == ("failed", "bad_x", "x is 13")
    assert np.isnan(out["y"][0]) and out["count"][0] == -1 and out["y"][1] == 4.0


def test_compute_raising_fails_its_rows_and_out_of_memory_halves_the_batch():
    stage = Scale().ready()
    out = stage.process(batch([1, -2, 3]))
    assert set(out["status"]) == {"failed"} and set(out["error_code"]) == {"scale_test_error"}
    Scale.calls.clear()
    out = stage.process(batch([1, 2, 3, -1]))
    assert list(out["status"]) == ["ok", "ok", "ok", "failed"] and out["error_code"][3] == "out_of_memory"
    assert Scale.calls == [4, 2, 2, 1, 1]  # the whole batch, its halves, then the half holding the bad row


def test_an_undeclared_column_is_an_error_not_a_silent_column():
    class Sloppy(Scale):
        def compute(self, batch):
            return {"y": np.zeros(len(batch["key"])), "z": np.zeros(len(batch["key"]))}

    with pytest.raises(KeyError, match="undeclared column 'z'"):
        Sloppy().ready().process(batch([1]))


def test_fan_out_rows_are_keyed_per_variant_and_keep_their_labels_when_failed():
    class Fan(Scale):
        def prepare(self, context):
            return Plan(outputs=(Column("y", "float64"),), variants=("a", "b"), labels=(Column("tag", "str"),))

        def variant_columns(self, variant):
            return {"tag": objects([["A", "B"][v] for v in variant])}

        def compute(self, batch):
            return {"y": np.asarray(batch["x"], float) + np.asarray(batch["variant"])}

    out = Fan().ready().process(batch([10, 20], failed=[1]))
    assert list(out["key"]) == ["k0|a", "k0|b", "k1|a", "k1|b"] and list(out["source_key"]) == ["k0", "k0", "k1", "k1"]
    assert list(out["tag"]) == ["A", "B", "A", "B"] and list(out["y"][:2]) == [10.0, 11.0]
    assert list(out["status"]) == ["ok", "ok", "failed", "failed"] and np.isnan(out["y"][2:]).all()


def test_a_stage_registers_itself_by_being_defined_and_a_subclass_is_no_new_command():
    stages = registered()
    assert {"ingest", "invert", "edit", "channels", "thumbnails"} <= set(stages)

    class Shout(Scale):
        name = "shout_test"
        help = "a test stage"

    class Quiet(Shout):  # inherits the help: not a command of its own
        name = "quiet_test"

    assert REGISTRY.pop("shout_test") is Shout and "quiet_test" not in REGISTRY


class Output:
    """A stage output as check_inputs sees it."""

    def __init__(self, **columns):
        self.path = "out/up"
        self.columns = {"key": Column("key", "str"), "status": Column("status", "str"),
                        "error_code": Column("error_code", "str"), "error": Column("error", "str"),
                        "row_id": Column("row_id", "str"), **{n: Column(n, *spec) for n, spec in columns.items()}}


def test_a_chain_is_checked_column_by_column_naming_stage_column_and_what_was_found():
    plan = Plan(inputs=(Column("wplus", "float32", (10, 512)), Column("image", "uint8", None)),
                rename={"aligned": "image"})
    sources.check_inputs("edit", plan, Output(wplus=("float32", (10, 512)), aligned=("uint8", (64, 64, 3))))
    with pytest.raises(ValueError, match=r"edit: the input out/up has no column `aligned`"):
        sources.check_inputs("edit", plan, Output(wplus=("float32", (10, 512))))
    with pytest.raises(ValueError, match=r"column `wplus` of out/up is float32\[18, 512\], float32\[10, 512\] needed"):
        sources.check_inputs("edit", plan, Output(wplus=("float32", (18, 512)), aligned=("uint8", (8, 8, 3))))
    broken = Output(wplus=("float32", (10, 512)), aligned=("uint8", (8, 8, 3)))
    del broken.columns["error_code"]
    with pytest.raises(ValueError, match="has no `error_code` column"):
        sources.check_inputs("edit", plan, broken)

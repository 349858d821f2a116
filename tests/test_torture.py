"""A fixed set of torture scenarios (tests/torture.py) within CI's budget; `make torture N=500` runs more."""

import torture

CI_SEEDS = "0-1"


def test_torture_scenarios_keep_every_invariant(tmp_path, capsys):
    assert torture.main(["--seeds", CI_SEEDS, "--work", str(tmp_path)]) == 0, capsys.readouterr().out[-5000:]

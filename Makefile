# The two set-up commands: `make demo` and `make test`. Both create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-style bench torture clean
N ?= 50

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/latentray sample --output out/samples.png --n 16 --seed 0
	$(PY) -m pipelines.demo out

demo-style: $(STAMP)
	$(PY) -m pipelines.demo_style out

bench: $(STAMP)
	$(PY) benchmarks/bench_generator.py
	$(PY) benchmarks/bench_invert.py
	$(PY) benchmarks/bench_device_path.py
	$(PY) benchmarks/bench_bdinvert.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_channels.py
	$(PY) benchmarks/bench_destylize.py
	$(PY) benchmarks/bench_dci.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_stages.py
	$(PY) benchmarks/bench_resume.py
	$(PY) benchmarks/bench_report.py
	$(PY) benchmarks/bench_encoder.py

torture: $(STAMP)  # N seeded fault scenarios (tests/torture.py); figures in torture.json
	$(PY) tests/torture.py --seeds 0-$$(($(N)-1)) --report torture.json

clean:
	rm -rf out .pytest_cache

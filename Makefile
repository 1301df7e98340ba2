# Two commands for a newcomer:  make demo   and   make test
PY := .venv/bin/python
export MALLOC_MMAP_THRESHOLD_ ?= 1000000000
export MALLOC_TRIM_THRESHOLD_ ?= 1000000000

.PHONY: setup demo test test-fast bench-perf bench-gpu clean

setup: .venv/.done

.venv/.done: pyproject.toml scripts/setup_env.sh scripts/install_learn2learn.sh
	scripts/setup_env.sh
	touch $@

demo: setup
	$(PY) -m fewshot data prepare glyphs
	$(PY) -m fewshot bench benchmarks/quickstart.toml --quick

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# issue 11's GPU figures (< 5 min on one CUDA GPU): benchmarks/results/gpu.{json,md}
bench-gpu: setup
	$(PY) benchmarks/perf/gpu.py --device cuda

clean:
	rm -rf .venv build *.egg-info

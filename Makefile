# Every target creates and uses the project's virtual environment itself (`make install` is implied).
# torch is pinned to the CPU build that installs from local disk here; on a CUDA machine run
# `make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"` or preinstall torch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install lock demo test test-lowest test-slow bench ui reference clean reproduce-table1 reproduce-cpu-scale reproduce-ablation-entropy-T \
	reproduce-ablation-kb-kt reproduce-ablation-weights reproduce-open-adaptive-entropy \
	reproduce-open-components reproduce-open-adaptive-k reproduce-open-weight-variance reproduce-open-mpo \
	reproduce-open-scaling reproduce-open-sparse

install: $(STAMP)

# Everything but torch within requirements.lock (the environment the committed figures were made
# with); pyproject.toml keeps the supported ranges. `make lock` rewrites the lock from .venv.
$(STAMP): pyproject.toml Makefile requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c requirements.lock
	touch $(STAMP)

lock: install
	{ sed -n '1,/^[^#]/{/^#/p}' requirements.lock; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -iv '^torch=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# The main job for a new user: QVPO learns Pendulum-v1 at reduced settings (gin/demo.gin), logged to MLflow.
demo: install
	$(BIN)/qvpo train --gin demo.gin --device cpu
	@echo
	@echo "For scale: on Pendulum-v1 a uniformly random policy scores about -1270 (tests/test_learning.py"
	@echo "measures it), a good policy about -150. Reduced settings: see gin/demo.gin."
	@echo "Open the run in the MLflow UI:  make ui   (then follow the printed link)"

# Unit, integration and learning tests (the CI command); the slowest tests are listed at the end.
test: install
	$(BIN)/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

# Longer checks behind the `slow` marker.
test-slow: install
	$(BIN)/python -m pytest -m slow --durations=15 $(PYTEST_ARGS)

# Speed benchmarks (pytest-benchmark): JSON in benchmarks/results/ (not committed); the tables, with
# a provenance line (commit, machine, torch, this command), written to docs/speed-results.md (the
# generated file docs/speed.md links to) and printed. The session header says which sampler path
# runs (native fused / native / torch ops) and why. PYTEST_ARGS (e.g. -k) runs a subset; the
# provenance line's command says so (table.py reads it from the environment: make exports it). Installs stable-baselines3 (optional extra `sb3`, torch kept at
# TORCH_SPEC) for the SB3 comparison.
bench: install
	$(BIN)/python -m pip install --quiet -e ".[dev,sb3]" $(TORCH_SPEC)
	mkdir -p benchmarks/results
	$(BIN)/python -m pytest benchmarks --benchmark-only \
		--benchmark-json=benchmarks/results/latest.json $(PYTEST_ARGS)
	$(BIN)/python benchmarks/table.py benchmarks/results/latest.json --out docs/speed-results.md

# The paper's Table 1: the sweep (skips finished runs, resumes interrupted ones), then the report.
# Overrides: STEPS=, SEEDS=, ENVS="Hopper-v5 Ant-v5", ALGOS="qvpo sac", BACKEND=local, WORKERS=2.
STEPS ?=
SEEDS ?=
ENVS ?=
ALGOS ?=
BACKEND ?= local
WORKERS ?= 1
reproduce-table1: install
	$(BIN)/qvpo sweep reproduce/table1/sweep.gin --backend $(BACKEND) --workers $(WORKERS) \
		$(if $(STEPS),--steps $(STEPS)) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(ENVS),--envs $(ENVS)) $(if $(ALGOS),--algos $(ALGOS))
	$(BIN)/qvpo report table1 --paper reproduce/table1/paper.csv

# The reduced protocol whose results are committed (reproduce/cpu_scale/README.md): QVPO, SAC, TD3
# on Hopper-v5 and Walker2d-v5, 3 seeds, 20k env steps, two runs at a time; then its report.
reproduce-cpu-scale: install
	$(BIN)/qvpo sweep reproduce/cpu_scale/sweep.gin --backend $(BACKEND) --workers 2
	$(BIN)/qvpo report cpu_scale --paper reproduce/table1/paper.csv --out reproduce/cpu_scale/results

# The paper's ablations (same overrides): each a sweep of QVPO variants, then its report.
SWEEP_FLAGS = --backend $(BACKEND) --workers $(WORKERS) $(if $(STEPS),--steps $(STEPS)) \
	$(if $(SEEDS),--seeds $(SEEDS)) $(if $(ENVS),--envs $(ENVS))
reproduce-ablation-entropy-T: install
	$(BIN)/qvpo sweep reproduce/ablation_entropy_T/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report ablation_entropy_T
reproduce-ablation-kb-kt: install
	$(BIN)/qvpo sweep reproduce/ablation_kb_kt/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report ablation_kb_kt
reproduce-ablation-weights: install
	$(BIN)/qvpo sweep reproduce/ablation_weights/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report ablation_weights

# Open questions (ours, not the paper's; same overrides): reproduce/open_*/README.md.
reproduce-open-adaptive-entropy: install
	$(BIN)/qvpo sweep reproduce/open_adaptive_entropy/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report open_adaptive_entropy --paper reproduce/table1/paper.csv
reproduce-open-adaptive-k: install
	$(BIN)/qvpo sweep reproduce/open_adaptive_k/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report open_adaptive_k --paper reproduce/table1/paper.csv
reproduce-open-components: install
	$(BIN)/qvpo sweep reproduce/open_components/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report open_components --paper reproduce/table1/paper.csv
reproduce-open-weight-variance: install
	$(BIN)/qvpo sweep reproduce/open_weight_variance/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report open_weight_variance
reproduce-open-mpo: install
	$(BIN)/qvpo sweep reproduce/open_mpo/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report open_mpo --paper reproduce/table1/paper.csv
reproduce-open-scaling: install
	$(BIN)/qvpo sweep reproduce/open_scaling/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report open_scaling --paper reproduce/table1/paper.csv
reproduce-open-sparse: install
	$(BIN)/qvpo sweep reproduce/open_sparse/sweep.gin $(SWEEP_FLAGS)
	$(BIN)/qvpo report open_sparse

# MLflow UI on 127.0.0.1 against the default store (sqlite:///mlflow.db or $MLFLOW_TRACKING_URI).
ui: install
	$(BIN)/qvpo ui

# The authors' code at the commit the parity tests compare with (tests/reference_import.py),
# cloned into .reference/ (git-ignored; never part of the package).
REFERENCE_COMMIT := 40a197473ecf68517b880cfc2c2ca4209f65c5ff
reference:
	test -d .reference/wadx2019-qvpo || git clone --quiet https://github.com/wadx2019/qvpo .reference/wadx2019-qvpo
	git -C .reference/wadx2019-qvpo checkout --quiet $(REFERENCE_COMMIT)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info

# The unit tests (as `make test`) against the lowest versions pyproject.toml admits: every direct
# dependency, and the test extra's, pinned to its floor (tools/lowest_constraints.py), in a venv of
# its own. torch is the exception: it stays at TORCH_SPEC, the only build checked here.
LOWEST_VENV ?= .venv-lowest
LOWEST_BIN  := $(LOWEST_VENV)/bin
LOWEST_TXT  := $(LOWEST_VENV)/lowest.txt

test-lowest:
	test -x $(LOWEST_BIN)/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_BIN)/python -m pip install --quiet --upgrade pip
	$(LOWEST_BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(LOWEST_BIN)/python tools/lowest_constraints.py --extra test > $(LOWEST_TXT)
	$(LOWEST_BIN)/python -m pip install --quiet -e ".[test]" -c $(LOWEST_TXT)
	@echo "Installed (direct dependencies at their floors):"
	@$(LOWEST_BIN)/python -m pip freeze | grep -iE "^(torch|$$(sed -n 's/==.*//p' $(LOWEST_TXT) | paste -sd'|'))=="
	$(LOWEST_BIN)/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

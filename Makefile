# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test bench pretrain experiment realtime dt-merge families bam collect lint clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make setup` takes well under a second.
# torch goes first, pinned: the CPU build from local disk; the project's range then admits it.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required, found " + sys.version)'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[metaworld,dev]"
	@touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) scripts/bench.py

# The shipped base's recipe, from nothing (~1 h on 2 cores); resumable.
pretrain: setup
	$(PY) scripts/pretrain.py

experiment: setup
	$(PY) scripts/experiment.py

# The demo's fine-tuned dense and AdaMoE policies at 50 Hz in real time, beside offline success
# (the same sampler both ways): each policy served from its own process, 2 flow steps from
# zero noise, a new chunk every two ticks (docs/main-job.md, "In real time").
realtime: setup
	$(PY) scripts/control.py --checkpoint outputs/demo/checkpoints/dense outputs/demo/checkpoints/adamoe \
		--suite tabletop-long --episodes 20 --inference process --inference-steps 2 --noise-scale 0 \
		--threshold 8 --moe-backend loop --output-dir outputs/realtime

dt-merge: setup
	$(PY) scripts/dt_merge.py

families: setup
	$(PY) scripts/families.py --eval-episodes 20 --update-docs

bam: setup
	$(PY) scripts/bam.py

collect: setup
	$(PY) scripts/collect.py --suite tabletop --episodes-per-task 50 --noise 0.0 0.1 0.3

lint: setup
	$(PY) -m ruff check adamoe envs policies scripts tests
	$(PY) -m ruff format --check adamoe envs policies scripts tests

clean:
	rm -rf $(VENV) outputs .pytest_cache

# Every target works on a fresh machine: `install` creates .venv once and re-installs
# only when pyproject.toml changes.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install train evaluate predict export serve test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: install
	$(PYTHON) -m railway_defect.train $(ARGS)

# the trained model's commands, e.g. make predict ARGS="ckpt_path=... input=photos/"
evaluate predict export serve: install
	$(PYTHON) -m railway_defect.$@ $(ARGS)

test: install
	$(PYTHON) -m pytest $(ARGS)

lint: install
	$(PYTHON) -m ruff check railway_defect hydra_plugins tests benchmarks
	$(PYTHON) -m ruff format --check railway_defect hydra_plugins tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

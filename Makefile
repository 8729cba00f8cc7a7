# The two commands of the README: `make demo` and `make test`. Both set up
# everything they need (a virtualenv with the package and its test servers)
# on a machine that has only python3, a C compiler and PostgreSQL 15.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench man venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/bootstrap.sh
	sh scripts/bootstrap.sh $(PYTHON) $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python perf/bench.py

man: $(STAMP)
	$(VENV)/bin/python scripts/build_man.py

clean:
	rm -rf $(VENV) build *.egg-info

# The two commands a fresh clone needs: `make demo` and `make test`.
# Both create .venv if missing and install gradwatch with constraints.txt,
# which pins torch to the CPU build on this machine's disk. `make demo`
# installs the package alone; `make test` adds the test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test

.PHONY: demo test test-portable bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $(STAMP)

$(TESTSTAMP): $(STAMP) pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(TESTSTAMP)

demo: $(STAMP)
	$(BIN)/gradwatch demo

test: $(TESTSTAMP)
	$(BIN)/python -m pytest -q

# The zoo's claims again under the portable (non-vectorised) CPU kernels, which round like another CPU.
test-portable: $(TESTSTAMP)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -m zoo

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache

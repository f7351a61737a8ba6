# The two commands a fresh clone needs: `make demo` and `make test`.
# Both create .venv if missing and install gradwatch with constraints.txt,
# which pins torch to the CPU build on this machine's disk. `make demo`
# installs the package alone; `make test` adds the test extras. pip byte-compiles what it installs: keep it so
# (with PYTHONDONTWRITEBYTECODE set, as on our machines, nothing else would, and every process would compile torch).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow test-portable test-portable-rest test-avx2 bench install install-test clean

install: $(STAMP)

install-test: $(TESTSTAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $(STAMP)

# One pip run for the package and its test extras (a second run would resolve and build the package again).
$(TESTSTAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP) $(TESTSTAMP)

demo: $(STAMP)
	$(BIN)/gradwatch demo

# Two pytest-xdist workers. Each test file runs whole on one worker, except the tests that read zoo runs: those go by
# seed (tests/conftest.py), so that each zoo run is trained once and the three seeds spread over the workers.
WORKERS ?= 2
PYTEST  := $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup

# Every claim on seed 0 natively; a zoo claim's seeds 1 and 2 (marked later_seeds by tests/conftest.py) run natively in
# make test-slow and, with seed 0, under the portable kernels in make test-portable(-rest).
test: $(TESTSTAMP)
	$(PYTEST) -m "not slow and not later_seeds"

# The repair benchmark's labels, checked by plain measurement on its slower set-ups, the doctor's slowest tables, and
# the zoo claims' seeds 1 and 2, natively (25–30 min on 2 cores).
test-slow: $(TESTSTAMP)
	$(PYTEST) -m "slow or later_seeds"

# The zoo's own claims (its set-ups' findings, the demo, its reports, the GAN's findings) again under the
# portable (non-vectorised) CPU kernels, which round like another CPU (slow-marked ones in make test-slow and, where
# marked portable, make test-portable-rest, which keeps CI within 20 minutes on an AVX2 EPYC).
# The repair benchmark's labels (tests/test_repair_setups.py) are its ground truth on the machine that runs it,
# natively, not a claim of the library's: they run natively, seed 0 in make test, seed 1 in make test-slow.
ZOO_OWN := tests/test_diagnosis.py tests/test_demo.py tests/test_report.py tests/test_remedies_and_doctor.py
test-portable: $(TESTSTAMP)
	ATEN_CPU_CAPABILITY=default $(PYTEST) -m "zoo and not slow" $(ZOO_OWN)

# ... and the round files', the tutorials' and the other zoo-marked claims under the portable kernels, with the
# slow ones marked portable (the doctor's three-seed table for the saturating GAN, round 8's zero_grad table): not in
# .ci/run, about 8 min on 2 cores more than its 20 minutes allow; run it, with make test-slow, before you trust a change.
test-portable-rest: $(TESTSTAMP)
	ATEN_CPU_CAPABILITY=default $(PYTEST) -m "zoo and (not slow or portable)" tests \
	  $(addprefix --ignore=,$(ZOO_OWN)) --ignore=tests/test_repair_setups.py
	ATEN_CPU_CAPABILITY=default $(PYTEST) -m "zoo and slow and portable" $(ZOO_OWN)

# ... and under an AVX2-only CPU such as an AMD EPYC: MKL's GEMM, oneDNN's convolutions and ATen's kernels
# limited to AVX2 (on an AVX-512 machine this changes their rounding; ATEN_CPU_CAPABILITY alone does not).
test-avx2: $(TESTSTAMP)
	MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PYTEST) -m zoo

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache

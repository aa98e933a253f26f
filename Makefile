# vlmrec: two set-up commands.
#   make demo   create .venv if missing, run the whole pipeline on the built-in sample data
#   make test   create .venv if missing, lint (ruff) and run the test suite
#   make fuzz   schemathesis over the Producer's OpenAPI against a live local Producer (benchmarks/fuzz.py)
# Both are idempotent: .venv is rebuilt only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlmrec-installed

# make demo DATA=../shared/data/movielens-small FORMAT=movielens   runs the same on real data
# make demo UI=1   also starts the demo page and keeps it and the Producer running until Ctrl-C
DATA    ?=
UI      ?=
FORMAT  ?= sample
WORKDIR ?= .vlmrec/$(FORMAT)
PYTEST_ARGS ?=
FUZZ_REQUESTS ?= 10000
FUZZ_SECONDS  ?= 900

.PHONY: demo test lint venv system-deps clean fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build on disk; anything that admits a newer torch would pull CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@! $(PY) -c "import torchvision" 2>/dev/null || (echo "torchvision is installed: it breaks beside the CPU torch (see README)"; exit 1)
	@touch $@

# redis-server for the Feast Redis online-store tests (tests start their own on 127.0.0.1);
# postgresql for Feast's SQL registry test (tests/conftest.py starts a server of its own);
# chromium + chromium-driver for the demo page's browser test (Selenium is given Debian's driver).
system-deps:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)
	@(command -v chromium >/dev/null && command -v chromedriver >/dev/null) || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv system-deps lint
	$(VENV)/bin/pytest -q --durations=40 $(PYTEST_ARGS)

# A Producer on 127.0.0.1 over a tiny world of its own, FUZZ_REQUESTS cases (valid and invalid by the schema),
# at most FUZZ_SECONDS; writes benchmarks/results/fuzz.json (requests, 5xx, schema violations). Exits 1 on any.
fuzz: venv
	nice -n 5 $(PY) benchmarks/fuzz.py --requests $(FUZZ_REQUESTS) --seconds $(FUZZ_SECONDS) \
		--out benchmarks/results/fuzz.json --strict

demo: venv
	$(VENV)/bin/vlmrec demo --workdir $(WORKDIR) --format $(FORMAT) $(if $(DATA),--data $(DATA),) $(if $(UI),--ui,)

clean:
	rm -rf .vlmrec

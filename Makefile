# vlmrec: two set-up commands.
#   make demo   create .venv if missing, run the whole pipeline on the built-in sample data
#   make test   create .venv if missing, lint (ruff) and run the test suite
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

.PHONY: demo test lint venv system-deps clean

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
# chromium + chromium-driver for the demo page's browser test (Selenium is given Debian's driver).
system-deps:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)
	@(command -v chromium >/dev/null && command -v chromedriver >/dev/null) || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv system-deps lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/vlmrec demo --workdir $(WORKDIR) --format $(FORMAT) $(if $(DATA),--data $(DATA),) $(if $(UI),--ui,)

clean:
	rm -rf .vlmrec

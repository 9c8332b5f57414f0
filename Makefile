# The few commands a contributor needs. Everything installs into .venv from the repo alone.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install run demo test test-slow lint fmt docs bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[local,dev]'
	touch $@

run: install            ## the service: embedded database, migrations, API, dashboard, workers
	$(VENV)/bin/embedq serve

demo: install           ## migrate, run demo jobs, embed and search the bundled documents
	$(VENV)/bin/embedq demo

test: install           ## the default suite (what CI runs)
	@sh scripts/ensure_chromium.sh  # the dashboard's browser test needs Debian's chromium
	@sh scripts/ensure_compose.sh  # tests/test_deployment.py runs `docker compose config`
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install      ## opt-in soak and chaos tests
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

docs: install          ## regenerate docs/cli.md and docs/settings.md
	$(VENV)/bin/typer embedq.cli utils docs --name embedq --output docs/cli.md
	$(PY) scripts/gen_settings_doc.py

bench: install .venv-pgai/.installed
	$(PY) bench/queue.py --json bench/results/queue.json
	$(PY) bench/pipeline.py --json bench/results/pipeline.json

# pgai (the pipeline benchmark's peer) lives in its own venv: its dependencies would replace
# torch and numpy in ours (see bench/pgai_peer.py).
.venv-pgai/.installed:
	python3 -m venv .venv-pgai
	.venv-pgai/bin/pip install -q 'pgai==0.12.1' 'openai>=1.44,<2' 'tiktoken>=0.7,<1' \
		'langchain-text-splitters>=0.2,<1' 'ijson>=3.3' 'filetype==1.2.0' 'pgvector>=0.3,<1' \
		numpy tokenizers
	touch $@

clean:
	rm -rf $(VENV) .venv-pgai .pytest_cache .mypy_cache .ruff_cache

# Quick start:  make run   (stream an answer from the bundled Gemma 3 270M)
#               make test  (run the test suite)
# Both create .venv on first use; later runs reuse it and are quick.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, pinned to the CPU wheel this machine carries; pyproject keeps torch>=2.5 for GPU users.
TORCH  ?= torch==2.13.0
# e.g. https://download.pytorch.org/whl/cpu for the CPU-only build (a plain pip install of torch on Linux is CUDA's)
TORCH_INDEX ?=
PROMPT ?= Explain quantum computing in simple terms:

.PHONY: run test bench clean-venv browser

# The chat page's tests drive Debian's Chromium through Playwright (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } || \
		{ echo "install Chromium (apt-get install chromium) for the chat page tests"; exit 1; }

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.installed
	$(PIP) install --quiet -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/gemmakit run "$(PROMPT)" --temperature 0.7 --repetition-penalty 1.1 --max-tokens 200

test: $(VENV)/.dev-installed browser
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/gemmakit bench

clean-venv:
	rm -rf $(VENV)

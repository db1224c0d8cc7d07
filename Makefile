PY ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: install test test-all schema demo
install:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first: the CPU build on this disk (never a multi-GB CUDA build).
	$(PIP) install -q -c .ci/constraints.txt "torch==2.13.*"
	$(PIP) install -q -c .ci/constraints.txt -e ".[dev]"
	# These two require torchvision only for parts we do not use (their dataset/CLIP modules); torchvision would
	# replace the CPU torch with a CUDA build, so they come without their dependencies.
	$(PIP) install -q --no-deps "k-diffusion==0.1.1.post1" "torch-fidelity==0.4.0"

test:
	$(PY) -m pytest -q

test-all:
	$(PY) -m pytest -q -m "slow or not slow"

schema:
	$(PY) -m s3search.schema_export

# The README's quick start: install, then an S³ search on the built-in 64-D mixture at NFE 5.
demo: install
	.venv/bin/s3search search --model gmm-64d --nfe 5 --budget 60

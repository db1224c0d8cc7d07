PY ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: install test test-all schema demo
install:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first: the CPU build on this disk (never a multi-GB CUDA build). pyproject.toml asks only for
	# torch>=2.4; .ci/constraints.txt holds every later install to this one.
	$(PIP) install -q -c .ci/constraints.txt "torch==2.13.*"
	# dev = service (API, runner, dashboard, Ray) + diffusers (diffusers and transformers) + the test tools.
	$(PIP) install -q -c .ci/constraints.txt -e ".[dev]"
	# The fid extra's torch-fidelity, and k-diffusion for the comparison tests: both require torchvision only for
	# parts we do not use (datasets, CLIP); torchvision would replace the CPU torch with a CUDA build, so they
	# come without their dependencies.
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

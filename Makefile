# The project's own install: CI and new machines start bare.
PY ?= python3
PIP ?= $(PY) -m pip
# torch 2.13.0 is the CPU build served from local disk on the project's machines. On a GPU machine keep its
# CUDA torch: `make demo TORCH=` installs nothing for torch.
TORCH ?= torch==2.13.0

# The chat page test (tests/test_chat_page.py) drives the operating system's Chromium through its chromedriver:
# Debian's packages, never a browser download; a CJK font so that its screenshots show Chinese.
BROWSER_PACKAGES ?= chromium chromium-driver fonts-wqy-microhei

.PHONY: install install-dev install-browser demo test lint
install:
	$(PIP) install -q $(TORCH) "setuptools>=64" -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .

install-dev: install install-browser
	$(PIP) install -q $(TORCH) -r requirements-dev.txt

# as root (or with password-less sudo) through apt-get; otherwise it says why and the page test skips (CI=true: fails)
install-browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && [ -d /usr/share/fonts/truetype/wqy ]; then \
		exit 0; \
	elif ! command -v apt-get >/dev/null; then \
		echo "install-browser: no apt-get here: install Chromium and its chromedriver as /usr/bin/chromium and" \
			"/usr/bin/chromedriver, or tests/test_chat_page.py skips"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			$(BROWSER_PACKAGES); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo -n apt-get update -q && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $(BROWSER_PACKAGES); \
	else \
		echo "install-browser: not root: skipped; as root: apt-get install $(BROWSER_PACKAGES)" \
			"(else tests/test_chat_page.py skips; under CI=true it fails)"; \
	fi

demo: install
	$(PY) examples/qwen/demo.py

test: install-dev
	$(PY) -m ruff check .
	hadolint Dockerfile
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
	hadolint Dockerfile

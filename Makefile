# mm3d: `make demo` (the main job on synthetic data) and `make test` (the test suite).
# Both create .venv when missing and install what they need, Debian packages included.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
APT_PKGS = libusb-1.0-0 libegl1 libgl1 libgomp1 libvulkan1 mesa-vulkan-drivers
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install install-test system-deps clean

demo: system-deps $(VENV)/.installed-base
	$(BIN)/mm3d demo --out $(DEMO_OUT)

test: system-deps $(VENV)/.installed-test
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

install: system-deps $(VENV)/.installed-base
install-test: system-deps $(VENV)/.installed-test

# Open3D needs libusb to import and EGL/Vulkan (Mesa) for its headless renderer.
system-deps:
	@if ! command -v dpkg >/dev/null 2>&1; then \
	  echo "mm3d: not a Debian system; make sure these (or equivalents) are installed: $(APT_PKGS)"; exit 0; fi; \
	missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "mm3d: installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null; \
	  else \
	    echo "mm3d needs these Debian packages:$$missing"; \
	    echo "run:  sudo apt-get update && sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@ $(VENV)/.installed-base

clean:
	rm -rf $(VENV) $(DEMO_OUT) runs .pytest_cache *.egg-info

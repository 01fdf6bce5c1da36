# mm3d: `make demo` (the main job on synthetic data) and `make test` (the test suite).
# Both create .venv when missing and install what they need, Debian packages included.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
APT_PKGS = libusb-1.0-0 libegl1 libgl1 libgomp1 libvulkan1 mesa-vulkan-drivers
# FFmpeg's shared libraries for the optional torchcodec backend (Debian 12 names). Installed when
# the system has them; where it does not, the torchcodec tests skip and say why.
APT_OPTIONAL = libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavfilter8 libavdevice59
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# `make test-floors`: the packages installed at their pyproject.toml floor (everything else, torch
# included, is reused from $(VENV)) and the tests run against them.
FLOOR_PKGS ?= timm einops av numpy
FLOOR_PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test test-floors install install-test system-deps clean

demo: system-deps $(VENV)/.installed-base
	$(BIN)/mm3d demo --out $(DEMO_OUT)

test: system-deps $(VENV)/.installed-test
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# A throwaway venv whose .pth file puts $(VENV)'s site-packages after its own, so the floor
# versions installed into it shadow the newer ones without downloading torch again. mm3d itself is
# installed into it (editable) because a plain path line does not run $(VENV)'s own .pth files.
test-floors: system-deps $(VENV)/.installed-test
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	pins=$$($(BIN)/python -c 'import re, sys; text = open("pyproject.toml").read(); \
	  print(*(re.search(r"\b" + n + r">=[\w.]+", text)[0].replace(">=", "==") for n in sys.argv[1:]))' $(FLOOR_PKGS)); \
	echo "mm3d test-floors: $$pins"; \
	$(BIN)/python -m venv --without-pip "$$tmp/venv"; \
	py="$$tmp/venv/bin/python"; \
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
	  > "$$($$py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mm3d-base-venv.pth"; \
	$(BIN)/python -m pip --python "$$py" install -q --no-deps $$pins; \
	$(BIN)/python -m pip --python "$$py" install -q --no-deps --no-build-isolation -e .; \
	"$$py" -c 'import importlib, sys; \
	  mods = [importlib.import_module(n) for n in ["torch", *sys.argv[1:]]]; \
	  print(*(f"mm3d test-floors: testing {m.__name__} {m.__version__} from {m.__file__}" for m in mods), sep="\n")' $(FLOOR_PKGS); \
	"$$py" -m pytest tests $(FLOOR_PYTEST_ARGS)

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
	fi; \
	optional=""; for p in $(APT_OPTIONAL); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || optional="$$optional $$p"; done; \
	if [ -n "$$optional" ]; then \
	  if [ "$$(id -u)" = 0 ] && { [ -n "$$missing" ] || apt-get update -qq; } && \
	     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$optional >/dev/null 2>&1; then \
	    echo "mm3d: installed FFmpeg libraries for torchcodec:$$optional"; \
	  else \
	    echo "mm3d: optional FFmpeg libraries for the torchcodec backend not installed:$$optional (its tests skip)"; \
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

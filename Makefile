# imapsync-bridge: `make test` and `make demo` do all set-up on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := dovecot-imapd chromium

.PHONY: install system-deps test lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Debian packages the tests run against. The package would start a system-wide Dovecot;
# a temporary policy-rc.d stops that (tests start their own on loopback). --no-remove:
# installing never removes another package (dovecot-imapd conflicts with cyrus-imapd
# and courier-imap); apt-get stops instead, and so does make, with a clear message.
system-deps:
	@missing=""; \
	for pkg in $(DEB_PACKAGES) $(EXTRA_DEB); do \
	  dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  created=""; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	    $(SUDO) chmod +x /usr/sbin/policy-rc.d; created=1; \
	  fi; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-remove $$missing; \
	  status=$$?; \
	  [ -n "$$created" ] && $(SUDO) rm -f /usr/sbin/policy-rc.d; \
	  if [ $$status -ne 0 ]; then \
	    echo "could not install$$missing (apt-get said why above); nothing was removed:" \
	      "installs never remove packages (dovecot-imapd conflicts with cyrus-imapd" \
	      "and courier-imap)" >&2; \
	  fi; \
	  exit $$status; \
	fi

test: install system-deps
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check imapsync_bridge tests scripts bench
	$(VENV)/bin/ruff format --check imapsync_bridge tests scripts bench
	$(VENV)/bin/mypy imapsync_bridge

demo: install system-deps
	$(PY) scripts/demo.py

bench: EXTRA_DEB = isync
bench: install system-deps
	$(PY) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis

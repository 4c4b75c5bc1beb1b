# imapsync-bridge: `make test` and `make demo` do all set-up on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := dovecot-imapd chromium

.PHONY: install system-deps test lint demo bench clean install-systemd

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

# The systemd units (contrib/systemd, docs/systemd.md), with ExecStart pointing at the
# installed command: BINDIR (default /usr/local/bin, where `sudo pip install .` puts it).
BINDIR      ?= /usr/local/bin
SYSTEMD_DIR ?= /etc/systemd/system
SYSTEMCTL   ?= systemctl
install-systemd:
	@test -x $(BINDIR)/imapsync-bridge || { echo "no $(BINDIR)/imapsync-bridge:" \
	  "install the package first (sudo pip install .) or pass BINDIR=DIR" >&2; exit 1; }
	@for unit in contrib/systemd/*.service; do \
	  sed "s|/usr/local/bin/imapsync-bridge|$(BINDIR)/imapsync-bridge|" $$unit \
	    | $(SUDO) tee $(SYSTEMD_DIR)/$$(basename $$unit) >/dev/null || exit 1; \
	  echo "installed $(SYSTEMD_DIR)/$$(basename $$unit)"; \
	done
	$(SUDO) $(SYSTEMCTL) daemon-reload
	@echo "next: docs/systemd.md (configuration, credentials, pairing, systemctl enable --now)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis

# smtprelay: `make run` starts a demo relay, `make test` runs the checks and the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
TWISTD := $(VENV)/bin/twistd
LISTEN ?= tcp://127.0.0.1:2525
SINK ?= tcp://127.0.0.1:2526
MAILDIR ?= $(CURDIR)/run/mail
APT_TEST_PACKAGES := postfix swaks libnet-ssleay-perl dovecot-core dovecot-lmtpd haproxy openssl prometheus

.PHONY: run check test venv test-deps soak image bench clean

$(PY):
	python3 -m venv $(VENV) || { [ "$$(id -u)" = 0 ] && apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv && python3 -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q -e '.[metrics]'
	touch $@

# Byte-compiled once here: a relay that compiles its own modules at every start
# (PYTHONDONTWRITEBYTECODE, read-only trees) peaks ~2.4 MB higher.
venv: $(VENV)/.installed
	@$(PY) -m compileall -q smtprelay twisted/plugins >/dev/null

## run: the relay on 127.0.0.1:2525 forwarding to a capture sink on 127.0.0.1:2526
run: venv
	@mkdir -p run $(MAILDIR)
	@[ ! -f run/sink.pid ] || kill `cat run/sink.pid` 2>/dev/null || true
	@rm -f run/sink.pid
	@$(TWISTD) --pidfile=run/sink.pid --logfile=run/sink.log smtprelay-sink --listen $(SINK) --dir $(MAILDIR)
	@echo "capture sink: $(SINK), messages are written to $(MAILDIR)"
	@echo "relay: $(LISTEN) -> $(SINK); try: swaks --server 127.0.0.1:2525 --to someone@example.org"
	@trap 'kill `cat run/sink.pid` 2>/dev/null' EXIT INT TERM; \
	  $(TWISTD) -n --pidfile= smtprelay --listen $(LISTEN) --target $(SINK)

## test-deps: the test extras in the venv and, as root, the real peers and podman from Debian
test-deps: venv
	$(PY) -m pip install -q -e '.[test]'
	@if [ "$$(id -u)" = 0 ] && ! { command -v smtp-sink && command -v swaks && command -v dovecot && command -v haproxy && command -v openssl && command -v promtool && perl -MNet::SSLeay -e1; } >/dev/null 2>&1; then \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_TEST_PACKAGES) >/dev/null; \
	  postfix status >/dev/null 2>&1 && postfix stop || true; \
	  systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	fi
	@if [ "$$(id -u)" = 0 ] && ! command -v podman >/dev/null; then sh contrib/container/container.sh setup >/dev/null; fi

## check: the types (mypy, with the mypy-zope plugin) and the rooms' dependency rules (lint-imports), as setup.cfg says
check: test-deps
	$(VENV)/bin/mypy smtprelay tests
	$(VENV)/bin/lint-imports

## test: the checks, then the whole trial suite (unit and integration)
test: check
	$(PY) -m twisted.trial $(TRIAL_ARGS) tests

## soak: the load tests ten times longer (150,000 messages; not part of make test)
soak: test-deps
	SMTPRELAY_LOAD_SCALE=10 $(PY) -m twisted.trial tests.test_load

## image: the container image localhost/smtprelay (podman; see contrib/container/build.sh)
image:
	sh contrib/container/build.sh

bench: venv
	sh benchmarks/run.sh

clean:
	rm -rf $(VENV) run _trial_temp *.egg-info build dist .mypy_cache .import_linter_cache

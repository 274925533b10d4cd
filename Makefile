# pam-linkus: the two README commands are `make demo` and `make test` (as root, Debian 12).
SHELL := /bin/bash
PYTHON := /usr/bin/python3
PREFIX ?= /opt/pam-linkus
SITE = $(PREFIX)/venv/lib/python3.11/site-packages
TEST_VENV := .venv
export DEBIAN_FRONTEND := noninteractive

# What a login needs (pam_python embeds /usr/bin/python3, so these come from Debian),
# and what install.sh builds the venv with (python3-venv, python3-wheel: no download from PyPI).
APT_RUNTIME := libpam-python python3-yaml python3-venv python3-wheel python3-ldap3 python3-segno
# What building and linting the Debian package needs (`make deb`, tests/test_debian_package.py).
APT_DEB := build-essential debhelper dh-python python3-all python3-setuptools python3-wheel \
           pybuild-plugin-pyproject lintian
# What the tests start or drive (python3-redis: the tests look at the server with redis-py;
# the Redis state store itself speaks RESP with pam_linkus.state.resp).
APT_TEST := $(APT_DEB) pamtester openssh-server slapd ldap-utils redis-server redis-sentinel python3-redis \
            libpam-google-authenticator \
            libpam-oath oathtool openssl procps passwd login \
            libpam0g-dev build-essential valgrind
PIP_TEST := pytest pytest-timeout aiosmtpd paramiko pexpect ruff mypy types-PyYAML types-redis python-pam

.PHONY: demo install deb deps-runtime deps-test native test lint bench clean

deps-runtime:
	bash packaging/apt-ensure.sh $(APT_RUNTIME)

deps-test: deps-runtime
	bash packaging/apt-ensure.sh $(APT_TEST)
	test -x $(TEST_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q $(PIP_TEST)
	$(TEST_VENV)/bin/pip install -q --no-deps -e .

## install: the package into $(PREFIX)/venv, the loader into /lib/security, default config.
install: deps-runtime
	bash packaging/install.sh "$(PREFIX)"

## demo: install, then one real login through PAM with a demo extension (touches no existing service).
demo: install
	$(PREFIX)/venv/bin/python -P packaging/demo.py  # -P: packaging/pam_linkus.py must not shadow the package

## deb: build the Debian package into dist/ from packaging/debian, and lint it (README: "Debian package").
deb:
	bash packaging/apt-ensure.sh $(APT_DEB)
	deb=$$(bash packaging/build-deb.sh dist | tail -n 1) && lintian --fail-on error,warning "$$deb" && echo "built $$deb"

## native: pam_linkus.so, its ASan/UBSan and canary builds and the test driver (native/Makefile).
native: deps-test
	$(MAKE) -C native all

## test: everything, against real PAM, sshd, slapd, SMTP and Redis on loopback.
test: deps-test native
	$(TEST_VENV)/bin/ruff check pam_linkus nss_config tests bench packaging
	$(TEST_VENV)/bin/mypy
	$(TEST_VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: deps-test
	$(TEST_VENV)/bin/ruff check pam_linkus nss_config tests bench packaging
	$(TEST_VENV)/bin/mypy

bench: deps-test native
	$(TEST_VENV)/bin/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(TEST_VENV) build dist *.egg-info
	$(MAKE) -C native clean

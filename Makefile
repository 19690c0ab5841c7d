# SIP Thor: build, lint and test.
#
#   make test   install what is missing (as root on Debian 12), lint, and run the
#               whole suite twice: on the latest PyPI releases (.venv) and on
#               Debian bookworm's own python3-* packages (/usr/bin/python3)
#   make lint   ruff check and format check
#   make deb    the Debian packages (build/deb/*.deb), lintian-clean
#   make deb-test  those packages installed in a clean bookworm container, suite run there
#   make molecule  the Ansible rollout on an 8-container cluster, verified
#   make demo   a whole network on one machine, watched with thor-monitor
#   make demo-sip  SIP devices registering and calling through 3 sip_proxy nodes
#   make bench  the benchmarks of bench/ (results go to docs/benchmarks.md by hand)

SHELL := /bin/bash
DEBIAN_PYTHON := /usr/bin/python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
# What the suite needs from Debian: the bookworm stack the servers run on,
# the tools to build the dev venv (psycopg2 compiles against libpq), Kamailio
# with app_python3 (the SIP proxy of sip_proxy nodes, etc/kamailio/thor.cfg),
# sipp (sip-tester: the SIP devices of the tests and benchmarks), rtpengine
# (userspace: the media relays of the tests), and the
# PostgreSQL and PowerDNS that thor-dns and NGNPro are tested against.
APT_PACKAGES := python3 python3-venv python3-pip python3-dev gcc libpq-dev git \
	python3-gevent python3-cryptography python3-dnspython python3-psycopg2 \
	python3-spyne python3-zeep python3-requests python3-pytest python3-hypothesis python3-yaml \
	python3-prometheus-client \
	kamailio kamailio-python3-modules sip-tester rtpengine-daemon postgresql pdns-server pdns-backend-pgsql \
	faketime
PYTEST_ARGS ?=

DEB_DIR := build/deb
DEB_BUILD_PACKAGES := debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject \
	lintian fakeroot dpkg-dev apt-utils gnupg
DEB_TEST_PACKAGES := docker.io debootstrap

.PHONY: test lint format deps venv promtool test-latest test-bookworm deb deb-test molecule demo demo-sip bench clean

# Bookworm's python3-* stack is tested once, through the packages (deb-test runs the
# whole suite against them); test-bookworm, the same suite from the source tree,
# stays for developers who have not built the packages.
test: deps venv lint test-latest deb-test molecule

deps:
	@missing=$$(for p in $(APT_PACKAGES) $(DEB_BUILD_PACKAGES) $(DEB_TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (install as root): $$missing"; exit 1; fi; \
		echo "installing Debian packages: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	$(DEBIAN_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# promtool (tests/test_alerts.py) from Debian's prometheus package, unpacked: no server is
# installed or started on this machine.
PROMTOOL := build/prometheus/usr/bin/promtool

$(PROMTOOL):
	rm -rf build/prometheus && mkdir -p build/prometheus/download
	cd build/prometheus/download && { apt-get download prometheus 2>/dev/null || \
		{ apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x build/prometheus/download/prometheus_*.deb build/prometheus
	$@ --version >/dev/null

promtool: $(PROMTOOL)

# The latest releases from PyPI, as a developer has them.
test-latest: venv $(PROMTOOL)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Debian bookworm's packages, as the servers have them: no venv, no pip.
test-bookworm: deps $(PROMTOOL)
	cd $(CURDIR) && PYTHONPATH=$(CURDIR) $(DEBIAN_PYTHON) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

BENCHES := eventserver membership dns lookup ngnpro sip media scale

bench: $(addprefix bench-,$(BENCHES))

# Each benchmark on both stacks, the dev venv's releases then bookworm's packages
# (bench/NAME_bench.py; results go to docs/benchmarks.md by hand).
bench-%: venv deps
	$(VENV)/bin/python bench/$*_bench.py
	PYTHONPATH=$(CURDIR) $(DEBIAN_PYTHON) bench/$*_bench.py

# Debian packages for bookworm, built with Debian's own Python (not pyenv's).
deb: deps
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	git ls-files -co --exclude-standard | grep -v '^build/' | tar -cf - -T - | tar -C $(DEB_DIR)/src -xf -
	cd $(DEB_DIR)/src && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b > ../build.log 2>&1 \
		|| { tail -40 ../build.log; exit 1; }
	lintian --fail-on error,warning $(DEB_DIR)/*.changes
	# A flat apt repository of the build (docs/packaging.md).
	mkdir -p $(DEB_DIR)/repo && cp $(DEB_DIR)/*.deb $(DEB_DIR)/repo/
	cd $(DEB_DIR)/repo && apt-ftparchive packages . > Packages && gzip -9kf Packages && apt-ftparchive release . > Release
	# Signed with REPO_GNUPGHOME's key (the operator's), or a throw-away one (debian/sign-repo).
	debian/sign-repo $(DEB_DIR)/repo
	ls $(DEB_DIR)/*.deb

# The packages installed in a clean Debian 12 container (built locally with
# debootstrap), running debian/tests against them.
deb-test: deb
	bash tests/infra/deb-test.sh $(DEB_DIR)

# The molecule cluster: 8 bookworm containers converged with playbooks/site.yml
# and the packages of make deb, checked for idempotence, then verified
# (molecule/cluster/tests). The CA lives in a fresh folder for each run.
molecule: deb venv
	bash tests/infra/docker.sh
	pki=$$(mktemp -d /tmp/thor-molecule-pki.XXXXXX) && \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH NO_COLOR=1 THOR_MOLECULE_PKI=$$pki $(VENV)/bin/molecule test -s cluster; \
	status=$$?; rm -rf $$pki; exit $$status

demo: deps venv
	$(VENV)/bin/python -m thor.cli.demo

# SIP through the overlay: NGNPro, 3 sip_proxy nodes with Kamailio, sipp devices calling.
demo-sip: deps venv
	$(VENV)/bin/python -m thor.cli.demo_sip

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info

# Postroom: `make run` starts the server on its embedded defaults, `make test` runs every test.
CARGO ?= cargo
PYTHON ?= python3

.PHONY: run build build-deps test deps unit e2e soak bench lint fmt fuzz deb

run: build-deps
	$(CARGO) run --release -p postroom -- serve

# What the build needs besides Rust: Debian's libssl headers and pkg-config (the smime crate's
# CMS is OpenSSL's; README "S/MIME"). Installed with apt-get when missing and run as root on
# Debian; elsewhere the message says what to install.
build-deps:
	@pkg-config --exists openssl 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config; \
		else \
			echo "postroom needs OpenSSL's headers and pkg-config to build: apt-get install libssl-dev pkg-config (Debian, Ubuntu) or your system's equivalent" >&2; exit 1; \
		fi; }

build: build-deps
	$(CARGO) build --workspace --all-targets

# The whole suite: Rust unit tests, then the end-to-end tests against the real binary.
test: build unit e2e

unit:
	$(CARGO) nextest run --workspace --no-tests=pass

# Python test clients (pytest, xdist, timeout) from PyPI.
deps:
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PYTHON) -m pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt

e2e: build deps
	$(PYTHON) -m pytest -n auto tests/e2e

# The kill -9 loop and the exactly-once invariant test of the e2e suite, longer:
# POSTROOM_SOAK_KILLS kills (default 100) spread over POSTROOM_SOAK_MESSAGES acknowledged messages
# (default 50,000); the invariant test for POSTROOM_INVARIANT_SECONDS (default 1800) or
# POSTROOM_INVARIANT_MESSAGES (default 30,000).
soak: build deps
	POSTROOM_SOAK_KILLS=$${POSTROOM_SOAK_KILLS:-100} POSTROOM_SOAK_MESSAGES=$${POSTROOM_SOAK_MESSAGES:-50000} \
	POSTROOM_INVARIANT_SECONDS=$${POSTROOM_INVARIANT_SECONDS:-1800} POSTROOM_INVARIANT_MESSAGES=$${POSTROOM_INVARIANT_MESSAGES:-30000} \
		$(PYTHON) -m pytest -m soak tests/e2e

bench:
	bash bench/run.sh

# Fuzz every parser and session for FUZZ_SECONDS each (default 60); replays fuzz/regressions first.
fuzz:
	bash fuzz/run.sh

# The Debian package (README "Install on a server"): a release build, then cargo-deb
# (`cargo install cargo-deb --locked`) writes target/debian/postroom_VERSION-1_ARCH.deb, its
# binary stripped, and the debug symbols beside it as postroom-dbgsym_VERSION-1_ARCH.ddeb.
deb: build-deps
	$(CARGO) deb -p postroom --dbgsym

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

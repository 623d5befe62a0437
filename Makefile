# mirrorfs — common tasks. `make run` gives a working three-way mirror at ./demo/mnt.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

CARGO        ?= cargo
BIN          := target/release/mirrorfs
DEMO         := demo
DEMO_BACKENDS := $(DEMO)/backend-a $(DEMO)/backend-b $(DEMO)/backend-c
DEMO_MNT     := $(DEMO)/mnt
# Integration tests mount real filesystems; a few in parallel keeps 2 cores busy.
TEST_THREADS ?= 4

.PHONY: all build run test bench bench-s3 lint deps

all: build

## deps: install the system packages (fuse3, rsync, git, attr, ...) when missing
deps:
	./.ci/install-deps

## build: release build of the library and the `mirrorfs` binary
build:
	$(CARGO) build --release

## run: format ./demo/backend-{a,b,c} once, then mount them at ./demo/mnt (Ctrl-C unmounts)
run: deps build
	mkdir -p $(DEMO)
	@empty=0; total=0; \
	for d in $(DEMO_BACKENDS); do \
	    total=$$((total + 1)); \
	    mkdir -p "$$d"; \
	    if [ -z "$$(ls -A "$$d")" ]; then empty=$$((empty + 1)); fi; \
	done; \
	if [ "$$empty" -eq "$$total" ]; then \
	    echo "formatting $(DEMO_BACKENDS)"; \
	    $(BIN) init $(DEMO_BACKENDS); \
	elif [ "$$empty" -ne 0 ]; then \
	    echo "some of $(DEMO_BACKENDS) are empty and some are not;" \
	         "remove $(DEMO) to start over" >&2; \
	    exit 1; \
	fi
	mkdir -p $(DEMO_MNT)
# A previous run that was killed leaves a dead mount ("Transport endpoint is not
# connected"); clear it so the new mount can take its place.
	@if ! stat $(DEMO_MNT) >/dev/null 2>&1; then fusermount3 -uz $(DEMO_MNT) || true; fi
	@echo "mounting at $(DEMO_MNT); press Ctrl-C to unmount"
	exec $(BIN) mount -f $(DEMO_BACKENDS) $(DEMO_MNT)

## test: unit and integration tests (needs FUSE; run as root for the permission tests)
test: deps
	$(CARGO) test --release --no-fail-fast -- --test-threads=$(TEST_THREADS)

## bench: the mirror benchmark, then a bucket backend against the raw S3 API
bench: deps
	$(CARGO) bench --bench mirror_bench
	$(CARGO) bench --bench s3_bench

## bench-s3: a bucket backend (local Garage server) against the raw S3 API
bench-s3: deps
	$(CARGO) bench --bench s3_bench

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# krun-oci — make targets used by people and CI.
SHELL := /bin/bash
CARGO ?= cargo
PROFILE ?= debug
TARGET_TRIPLE := x86_64-unknown-linux-gnu
CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)
BIN_DIR := target/$(PROFILE)
# The guest init is always an optimized build: it is copied into every VM's
# initramfs, where a 40 MB debug binary costs boot time under TCG.
INIT_STATIC := target/$(TARGET_TRIPLE)/release/krun-oci-init
PREFIX ?= /usr/local
export PATH := $(HOME)/.cargo/bin:$(PATH)

APT_PACKAGES := qemu-system-x86 busybox-static libcap-ng-dev libseccomp-dev runc crun podman \
	containerd cpio xz-utils python3 file procps util-linux bc \
	linux-source-6.12 flex bison libelf-dev libssl-dev build-essential \
	iproute2 curl iptables containernetworking-plugins netavark aardvark-dns
CARGO_HELPERS := virtiofsd vhost-device-vsock

.PHONY: all build init hostile-init soak kernel kernel-test test test-clients unit-test conformance bench fuzz demo install deps fmt lint clean

all: build

## build: the runtime, shim, conformance runner, and the static guest init.
build: init
	$(CARGO) build --workspace $(CARGO_PROFILE_FLAG)

## init: the static guest binaries (glibc, crt-static; musl is not installable here):
## krun-oci-init, and the conformance checker that runs as a container's main.
## Stripped and built for size (opt-level s, fat LTO, one codegen unit): every VM holds
## the init twice in guest RAM (initramfs, and the tmpfs it unpacks to) and QEMU maps the
## initramfs; the symbols are 1 MB, and size optimisation takes netlink (rtnetlink,
## tokio) from 6.7 MB back to 4.6 MB.
INIT_BUILD_ENV := CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
	CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
init:
	$(INIT_BUILD_ENV) $(CARGO) build -p krun-oci-init -p krun-oci-conformance --bin krun-oci-init \
		--bin conformance-checker --target $(TARGET_TRIPLE) --release

## hostile-init: the hostile test guest (init built with --features hostile,
## init/src/guest/hostile.rs) for runtime/tests/hostile.rs; never installed. Cargo
## puts both builds at one path, so it is copied out and the real init put back
## (cached: no rebuild, only the copy).
HOSTILE_INIT := target/hostile/krun-oci-init
hostile-init:
	$(INIT_BUILD_ENV) $(CARGO) build -p krun-oci-init --features hostile --bin krun-oci-init \
		--target $(TARGET_TRIPLE) --release
	install -D -m 0755 $(INIT_STATIC) $(HOSTILE_INIT)
	$(MAKE) init

## kernel: our own guest kernel from Debian's linux-source-6.12 (cached; see docs/kernel.md).
kernel:
	kernel/build.sh

## kernel-test: boot our kernel in both QEMU modes (ACPI, and acpi=off = libkrun's device model).
kernel-test: kernel
	kernel/boot-test.sh -n 1

## test: every test, the end-to-end ones on real microVMs (our kernel, TCG here) included.
test: build hostile-init kernel-test
	KRUN_OCI_INIT=$(CURDIR)/$(INIT_STATIC) KRUN_OCI_INIT_TEST_BIN=$(CURDIR)/$(INIT_STATIC) KRUN_OCI_REQUIRE_VM=1 \
	KRUN_OCI_HOSTILE_INIT=$(CURDIR)/$(HOSTILE_INIT) \
		$(CARGO) test --workspace --exclude krun-oci-clients $(CARGO_PROFILE_FLAG) -- --test-threads=2
	KRUN_OCI_INIT=$(CURDIR)/$(INIT_STATIC) $(CURDIR)/$(BIN_DIR)/conformance run \
		--runtime $(CURDIR)/$(BIN_DIR)/krun-oci --timeout 180 --preflight \
		--expected-failures conformance/expected-differences.txt
	# The same suite with a warm pool of 2 serving every create (docs/pool.md).
	KRUN_OCI_INIT=$(CURDIR)/$(INIT_STATIC) $(CURDIR)/$(BIN_DIR)/conformance run \
		--runtime $(CURDIR)/$(BIN_DIR)/krun-oci --timeout 180 --pool 2 \
		--expected-failures conformance/expected-differences.txt
	# A short soak: every workload of `make soak` four times, with the leak check.
	$(MAKE) soak SOAK_CYCLES=24
	# The clients last, once (the workspace run above leaves them out).
	$(MAKE) test-clients

## soak: SOAK_CYCLES lifecycles (default 1000) of mixed workloads, SOAK_PARALLEL at a
## time (default 2), each checked; then a leak check against a snapshot taken before.
## One summary line; exit 1 on any failure or leak (docs/reliability.md).
SOAK_CYCLES ?= 1000
SOAK_PARALLEL ?= 2
soak: build
	KRUN_OCI_INIT=$(CURDIR)/$(INIT_STATIC) $(CURDIR)/$(BIN_DIR)/conformance soak \
		--runtime $(CURDIR)/$(BIN_DIR)/krun-oci --cycles $(SOAK_CYCLES) --parallel $(SOAK_PARALLEL) \
		--timeout 180

## test-clients: podman and containerd (both shims) driving krun-oci (clients/tests/clients.rs);
## one summary line; a host that cannot run them prints `SKIP: why` and passes.
## A subset: make test-clients CLIENTS="shim_run podman_stop".
test-clients: build
	KRUN_OCI_INIT=$(CURDIR)/$(INIT_STATIC) KRUN_OCI_REQUIRE_VM=$${KRUN_OCI_REQUIRE_VM:-1} \
	KRUN_OCI_BIN_DIR=$(CURDIR)/$(BIN_DIR) \
		$(CARGO) test -p krun-oci-clients --test clients $(CARGO_PROFILE_FLAG) -- $(CLIENTS)

## conformance: the suite against runc (the oracle) and krun-oci; writes docs/conformance.md.
conformance: build
	KRUN_OCI_INIT=$(CURDIR)/$(INIT_STATIC) ./scripts/conformance.sh $(CURDIR)/$(BIN_DIR)/krun-oci

## unit-test: tests that need no VM.
unit-test:
	$(CARGO) test --workspace --lib --bins $(CARGO_PROFILE_FLAG)

## bench: figures (never asserted) — boot, start, exec, memory — for the release build (what `make install` ships); see docs/benchmarks.md.
bench: init
	$(MAKE) build PROFILE=release
	KRUN_OCI_INIT=$(CURDIR)/$(INIT_STATIC) ./scripts/bench.sh $(CURDIR)/target/release/krun-oci

## fuzz: the protocol decoder under libFuzzer for FUZZ_SECONDS (default 60), with a
## nightly toolchain and cargo-fuzz installed here when missing; see docs/reliability.md.
## The corpus grows in target/fuzz-corpus/frames (seeded from fuzz/seeds/frames); a
## crash is saved in fuzz/artifacts/frames/ and fails the target.
FUZZ_SECONDS ?= 60
fuzz:
	rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	mkdir -p target/fuzz-corpus/frames
	cd fuzz && $(CARGO) +nightly fuzz run frames ../target/fuzz-corpus/frames seeds/frames -- \
		-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 25; \
		exit $${PIPESTATUS[0]}

## demo: boot a busybox container in a microVM and show its output, state and logs.
demo: deps build kernel
	KRUN_OCI_INIT=$(CURDIR)/$(INIT_STATIC) ./scripts/demo.sh $(CURDIR)/$(BIN_DIR)/krun-oci

## install: krun-oci, the shim and the guest init under $(PREFIX).
install:
	$(MAKE) build PROFILE=release
	install -D -m 0755 target/release/krun-oci $(DESTDIR)$(PREFIX)/bin/krun-oci
	install -D -m 0755 target/release/containerd-shim-krun-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-krun-v2
	install -D -m 0755 $(INIT_STATIC) $(DESTDIR)$(PREFIX)/lib/krun-oci/krun-oci-init

## deps: system packages and helper binaries (idempotent; skips what is present).
deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi
	@for h in $(CARGO_HELPERS); do \
		command -v $$h >/dev/null || $(CARGO) install --locked $$h; \
	done

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p krun-oci-init --features hostile -- -D warnings

clean:
	$(CARGO) clean

# Frakti: `make demo` runs a container in a VM with the frakti CLI; `make test` runs every check.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
TARGET := x86_64-unknown-linux-gnu
AGENT := target/$(TARGET)/release/frakti-agent
VMM := target/$(TARGET)/release/frakti-vmm
GUEST_TOOL := target/$(TARGET)/release/frakti-guest-tool
STATIC := CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
GUEST_DIR := target/frakti/guest
TEST_LOG := target/test.log
LAB := $(CARGO) run -q -p frakti-tests --bin frakti-lab --

export FRAKTI_GUEST_KERNEL := $(abspath $(GUEST_DIR)/vmlinux)
export FRAKTI_GUEST_INITRD := $(abspath $(GUEST_DIR)/initrd.cpio)
export FRAKTI_VMM := $(abspath $(VMM))
export FRAKTI_GUEST_TOOL := $(abspath $(GUEST_TOOL))

.PHONY: build deps kernel agent vmm guest-tool assets demo bench fuzz lint unit e2e test clean help

help:
	@echo "make demo   start the daemon (directly or in the lab), import a small image, frakti run it"
	@echo "make test   fmt check, clippy, unit tests, end-to-end tests (in the lab where needed)"
	@echo "make assets build the guest kernel (cached), the initrd with the static agent, frakti-vmm"
	@echo "make bench  benchmarks as ratios: boot/disk/vsock vs qemu -M microvm, image pulls vs containerd, EROFS vs ext4, CRI pods, streaming, networks and block volumes vs containerd + runc"
	@echo "make fuzz   run each cargo-fuzz target for FUZZ_SECONDS (default 120)"
	@echo "make deps   check/install the Debian packages the build and tests need"

build:
	$(CARGO) build --workspace

deps:
	@scripts/deps.sh

# The kernel build is cached by fragment/source/script hash; copying is cheap.
kernel: deps
	@vmlinux=$$(guest-kernel/build.sh) && mkdir -p $(GUEST_DIR) && cp -u "$$vmlinux" $(GUEST_DIR)/vmlinux

# Static binaries: only the target gets +crt-static (build scripts stay
# dynamic). A static frakti-vmm maps no libc.so/ld.so: less RSS per VM.
agent:
	$(STATIC) $(CARGO) build --release -p frakti-agent --target $(TARGET)

vmm:
	$(STATIC) $(CARGO) build --release -p frakti-vmm --target $(TARGET)

# The test guests' traffic peer (vsock echo, TCP sender).
guest-tool:
	$(STATIC) $(CARGO) build --release -p frakti-guest-tool --target $(TARGET)

assets: kernel agent vmm guest-tool
	$(LAB) initrd --agent $(AGENT) --out $(GUEST_DIR)/initrd.cpio

demo: assets
	$(CARGO) build --release -p frakti-cri --bin frakti
	$(LAB) demo

# frakti-vmm vs QEMU microvm, as ratios (not tests): boot time and memory,
# then sequential disk read in the guest, then vsock throughput; then image
# pulls, frakti vs containerd (which needs target/release/frakti), and the
# image disk formats (EROFS vs ext4: size, build, guest reads).
bench: assets
	$(CARGO) run -q --release -p frakti-bench --bin boot
	$(CARGO) run -q --release -p frakti-bench --bin disk
	$(CARGO) run -q --release -p frakti-bench --bin vsock
	$(CARGO) run -q --release -p frakti-bench --bin contention
	$(CARGO) run -q --release -p frakti-bench --bin net
	$(CARGO) run -q --release -p frakti-bench --bin config_latency
	$(CARGO) build --release -p frakti-cri
	$(CARGO) run -q --release -p frakti-bench --bin images
	$(CARGO) run -q --release -p frakti-bench --bin image_disks
	$(CARGO) run -q --release -p frakti-bench --bin cri

# Each fuzz target for FUZZ_SECONDS (not part of `make test`). cargo-fuzz on
# stable Rust needs RUSTC_BOOTSTRAP=1 for libFuzzer's sanitizer flags.
FUZZ_SECONDS ?= 120
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	cd vmm/fuzz && for target in block_request mmio_transport vsock_packet net_tx api_request; do \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done
	cd cri/fuzz && for target in cni_documents layer_tar registry_documents runtime_inputs spdy_frames websocket_messages; do \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done
	cd agent/fuzz && for target in device_rules in_root_paths user_namespace; do \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Everything but the lab suites; includes frakti-vmm's tiny-guest tests on
# the host's /dev/kvm.
unit:
	$(CARGO) test --workspace --exclude frakti-tests 2>&1 | tee -a $(TEST_LOG)
	cd vmm/fuzz && $(CARGO) test --no-default-features 2>&1 | tee -a ../../$(TEST_LOG)
	cd agent/fuzz && $(CARGO) test --no-default-features 2>&1 | tee -a ../../$(TEST_LOG)
	$(CARGO) test -p frakti-tests --lib --bins 2>&1 | tee -a $(TEST_LOG)

# The CRI suite runs the daemon (debug build) in the lab beside the tests;
# frakti-vmm's tiny-guest test binary goes there too (the pause/resume race
# on real KVM).
e2e: assets
	$(CARGO) build -p frakti-cri --bin frakti
	FRAKTI_TINY_GUEST_TEST=$$($(CARGO) test -q -p frakti-vmm --test tiny_guest --no-run --message-format=json \
		| python3 -c 'import json,sys; ms = [json.loads(l) for l in sys.stdin]; print(next(m["executable"] for m in ms if m.get("executable") and m["target"]["name"] == "tiny_guest"))') \
		&& export FRAKTI_TINY_GUEST_TEST \
		&& $(CARGO) test -p frakti-tests --test lab --test e2e 2>&1 | tee -a $(TEST_LOG)

test: deps
	@mkdir -p target && rm -f $(TEST_LOG)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory unit
	$(MAKE) --no-print-directory e2e
	@awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($$(i+1) ~ /^passed/) p += $$i; if ($$(i+1) ~ /^failed/) f += $$i } } \
		END { printf "total: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' $(TEST_LOG)

clean:
	$(CARGO) clean

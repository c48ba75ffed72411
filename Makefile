# kvs-frames: every setup step a fresh Debian 12 machine needs, and the project's commands.
#
#   make deps      install the Debian packages the crate, its tests and examples need (no-op when present)
#   make test      deps + every test of both crates (kvs-frames, kvs-emulator): unit, integration, doc tests
#   make lint      deps + rustfmt --check, clippy -D warnings, rustdoc -D warnings (both crates)
#   make demo      deps + the frame-reader demo against the embedded emulator for about 20 s
#   make emulator  run the kvs-emulator program on 127.0.0.1:4566 (Ctrl+C stops it)
#   make fresh-check  the README's two commands on a brand-new Debian 12 root (debootstrap + chroot; root)

SHELL := /bin/bash
CARGO ?= cargo
EMULATOR_ARGS ?= --port 4566

# Debian packages, everything a fresh Debian 12 needs beyond a Rust toolchain, a C compiler and make:
# - to build: pkg-config and the GStreamer headers of the -sys crates (gstreamer-rtsp-server's for
#   the tests' RTSP camera);
# - at run time: the plugins of every GStreamer element the crate, its examples, tests and benches
#   create (the table in src/elements.rs names each element's package; tests/fresh_machine.rs
#   checks that every package there is listed here), gst-launch-1.0 for the tests that run real
#   producer pipelines, and a font for the emulator's textoverlay.
BUILD_PACKAGES := pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev
RUNTIME_PACKAGES := libgstreamer1.0-0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-x \
	gstreamer1.0-tools fonts-dejavu-core
DEB_PACKAGES := $(BUILD_PACKAGES) $(RUNTIME_PACKAGES)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# $(call install_missing,TARGET,PACKAGES): apt-get installs those of PACKAGES not installed yet.
define install_missing
missing=""; \
for p in $(2); do \
  dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
  echo "make $(1): installing$$missing"; \
  $(SUDO) apt-get update -qq && \
  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
fi
endef

.PHONY: deps test lint demo bench bench-compare bench-latency perf-memory emulator fresh-check fmt clean

deps:
	@$(call install_missing,deps,$(DEB_PACKAGES))
	@command -v $(CARGO) >/dev/null || { echo "make deps: cargo not found: install Rust >= 1.94.1 with rustup"; exit 1; }

test: deps
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --all-features --lib --bins --tests --examples; \
	else \
	  $(CARGO) test --workspace --all-features --lib --bins --tests --examples; \
	fi
	$(CARGO) test --workspace --all-features --doc

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --all-features

DEMO_ARGS ?= --emulator --duration 20 --snapshot-dir target/demo-snapshots --snapshot-every 125

demo: deps
	$(CARGO) run --example demo_kvs_hls_reader -- $(DEMO_ARGS)

# Benchmarks are not part of `make test` (they measure, they do not check); `make lint` compiles them.
# `make bench` runs the criterion benches and then the side-by-side comparison.
bench: deps
	$(CARGO) bench --workspace --all-features
	$(MAKE) bench-compare

# Frame latency behind the camera, HLS and GetMedia side by side on one emulator camera (also
# part of `cargo bench`); LATENCY_SECONDS sets the run length.
bench-latency: deps
	$(CARGO) bench --all-features --bench latency

# CPU per frame beside the ffmpeg CLI and Python OpenCV: installs Debian's ffmpeg and python3-venv
# (only for this target), OpenCV from PyPI into a venv under target/compare/.
COMPARE_PACKAGES := ffmpeg python3-venv
bench-compare: deps
	@$(call install_missing,bench-compare,$(COMPARE_PACKAGES))
	$(CARGO) build --release --example demo_kvs_hls_reader
	python3 benches/compare.py

perf-memory: deps
	$(CARGO) run --release --example perf_memory

emulator: deps
	$(CARGO) run -p kvs-emulator -- $(EMULATOR_ARGS)

# Needs root; caches the Debian root under /var/cache/kvs-frames-fresh (FRESH_REBUILD=1 renews it).
fresh-check:
	bash .ci/fresh-check

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

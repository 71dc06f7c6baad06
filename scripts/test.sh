#!/usr/bin/env bash
# Installs what the integration tests need (OpenSSH server and client, curl, procps, iproute2
# and nftables for the network fault tests, man-db to render the man pages, systemd for
# systemd-socket-activate and systemd-analyze; it is not started; socat, whose
# so-bindtodevice plays another user's device-bound client of the front door) when missing,
# then checks formatting, lints and that the benchmark and the fuzz targets build, and runs the
# whole test suite.
# Works on a fresh Debian 12 machine as root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-agent >/dev/null || need+=(openssh-client)
command -v curl >/dev/null || need+=(curl)
command -v setpriv >/dev/null || need+=(util-linux)
command -v pgrep >/dev/null || need+=(procps)
command -v script >/dev/null || need+=(bsdutils)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v man >/dev/null || need+=(man-db)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v socat >/dev/null || need+=(socat)
command -v perl >/dev/null || need+=(perl-base)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "scripts/test.sh: please install: ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" \
        || { apt-get update && apt-get install -y --no-install-recommends "${need[@]}"; }
fi

log="$(mktemp)"
skips="$(mktemp)"
trap 'rm -f "$log" "$skips"' EXIT
export FLEET_BROKER_TEST_SKIPS="$skips"
# The gates the README promises, before the tests: formatting, lints, the benchmark builds.
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# The vendored russh prints nothing outside its tests: a print left in it would land in
# every daemon's log for every packet.
cargo clippy --locked -p russh --no-default-features --features ring,rsa,flate2 --lib -- \
  -A clippy::all -A warnings -D clippy::print_stdout -D clippy::print_stderr -D clippy::dbg_macro
cargo bench --locked --no-run
# The fuzz targets (a workspace of their own; running them needs nightly, checking does not).
cargo check --locked --manifest-path fuzz/Cargo.toml
# No cycle between the modules of src/, with the project's shared tool where it sits beside
# the checkout.
if [ -f ../shared/tools/modcycles.py ]; then
    cycles="$(python3 ../shared/tools/modcycles.py src)"
    echo "$cycles" | tail -n 1
    echo "$cycles" | tail -n 1 | grep -q ' 0 cycles$' || { echo "$cycles" >&2; exit 1; }
fi
set +e
cargo test --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The patched russh's own tests of what was changed in it (patches/russh/PATCHES.md).
cargo test --locked -p russh --no-default-features --features ring,rsa,flate2 \
    --test test_window_release --test test_window_adjust --test test_backpressure \
    --test test_close_first 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cargo test --locked -p russh --no-default-features --features ring,rsa,flate2 --lib rekey \
    2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cargo test --locked -p russh --no-default-features --features ring,rsa,flate2 --lib \
    received_without_copies 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
set -e
ignored="$(sed -n 's/^test \(.*\) \.\.\. ignored.*$/\1/p' "$log" | sort -u)"
awk -v skipped="$(grep -c . "$skips" || true)" \
    '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d ignored, %d skipped\n", p, f, i, skipped }' "$log"
[ -z "$ignored" ] || echo "ignored (run with -- --ignored): $(echo $ignored)"
[ ! -s "$skips" ] || { echo "skipped:"; sed 's/^/  /' "$skips"; }
exit "$status"

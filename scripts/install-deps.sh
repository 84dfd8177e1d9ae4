#!/bin/sh
# Installs the Debian bookworm packages squall builds, tests and benchmarks with, but only
# those that are missing, so `make run` and `make test` cost one dpkg-query when all is there.
set -eu

packages="build-essential pkg-config libuv1-dev node-llhttp libspdlog-dev libfmt-dev doctest-dev \
libtomlplusplus-dev libcli11-dev nlohmann-json3-dev libcurl4-openssl-dev libsqlite3-dev libpq-dev postgresql \
libsystemd-dev libssl-dev curl python3 python3-pytest python3-aiosmtpd systemd logrotate \
clang libclang-rt-14-dev openssl"

case "${1:-}" in
  --bench) packages="$packages wrk nginx nodejs util-linux procps nghttp2-client python3-tornado python3-pycurl postfix" ;;
esac

missing=""
for package in $packages; do
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  case "$status" in
    *"install ok installed"*) ;;
    *) missing="$missing $package" ;;
  esac
done
[ -z "$missing" ] && exit 0

echo "install-deps: installing:$missing" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: these Debian packages are missing and installing them needs root:$missing" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing

#!/usr/bin/env bash
# Installs the real components imgfleet's build and tests use, if missing:
# protoc and the protobuf well-known types (etcd-client's build script), etcd, the
# CNCF distribution registry, skopeo, htpasswd, curl, containerd, Prometheus, and a
# Python venv with grpcio and opentelemetry-proto (the OTLP receiver of the trace test)
# and cryptography (cosign-format signature fixtures; no cosign binary installs here).
# Idempotent; needs root or sudo on Debian.
#
# Each need is checked by a file its package provides, not only by a command on
# PATH: `protoc` without `libprotobuf-dev` is on PATH yet cannot compile
# etcd-client's protos, which import google/protobuf/descriptor.proto.
set -euo pipefail

# file that must exist (absolute path, or a command name looked up on PATH) → package
needs=(
  "protoc protobuf-compiler"
  "/usr/include/google/protobuf/descriptor.proto libprotobuf-dev"
  "etcd etcd-server"
  "docker-registry docker-registry"
  "skopeo skopeo"
  "htpasswd apache2-utils"
  "curl curl"
  "containerd containerd"
  "ctr containerd"
  "prometheus prometheus"
  "promtool prometheus"
  "python3 python3"
)
missing=()
for need in "${needs[@]}"; do
  read -r file pkg <<<"$need"
  case $file in
    /*) [ -e "$file" ] && continue ;;
    *) command -v "$file" >/dev/null 2>&1 && continue ;;
  esac
  case " ${missing[*]} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

# The test Python: PyPI's grpcio and opentelemetry-proto (the OTLP receiver of
# the trace test) and cryptography (cosign-format signature fixtures) in a venv,
# checked by importing them; tests/src/otlp.rs and tests/src/cosign.rs use it.
venv=/opt/imgfleet-py
test_python() {
  "$venv/bin/python" -c 'import grpc, cryptography; from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc' 2>/dev/null
}
install_test_python() {
  test_python && return 0
  if ! $sudo python3 -m venv "$venv" 2>/dev/null; then
    $sudo apt-get install -y -qq --no-install-recommends python3-venv
    $sudo python3 -m venv "$venv"
  fi
  $sudo "$venv/bin/pip" install -q grpcio opentelemetry-proto cryptography
  test_python || { echo "install-deps: grpcio, opentelemetry-proto and cryptography are not importable in $venv" >&2; exit 1; }
}

if [ ${#missing[@]} -eq 0 ]; then
  install_test_python
  exit 0
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# The Debian packages of etcd, docker-registry, containerd and prometheus try to start system
# services; policy-rc.d keeps them from doing so, since tests start their own instances.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
for need in "${needs[@]}"; do
  read -r file pkg <<<"$need"
  case $file in
    /*) [ -e "$file" ] || { echo "install-deps: $pkg was installed but $file is still missing" >&2; exit 1; } ;;
    *) command -v "$file" >/dev/null 2>&1 || { echo "install-deps: $pkg was installed but $file is not on PATH" >&2; exit 1; } ;;
  esac
done
install_test_python

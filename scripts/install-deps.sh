#!/usr/bin/env bash
# Installs the real components imgfleet's build and tests use, if missing:
# protoc (etcd-client's build script), etcd, the CNCF distribution registry,
# skopeo and htpasswd. Idempotent; needs root or sudo on Debian.
set -euo pipefail

declare -A want=(
  [protoc]=protobuf-compiler
  [etcd]=etcd-server
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [htpasswd]=apache2-utils
  [curl]=curl
)
missing=()
for bin in "${!want[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${want[$bin]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# The Debian packages of etcd and docker-registry try to start system services;
# policy-rc.d keeps them from doing so, since tests start their own instances.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"

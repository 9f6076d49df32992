#!/usr/bin/env bash
# imgfleet quickstart: runs the main job on loopback, from a fresh Debian machine with Rust.
#
#   1. installs the real components (docker-registry, skopeo, ...) if missing;
#   2. builds the workspace's binaries (debug);
#   3. starts a local upstream registry (htpasswd admin/Harbor12345) holding a generated
#      sample image library/nginx:latest;
#   4. starts a hub on its embedded store, enrolls cluster edge-1 and starts its agent;
#   5. applies the seed's RegistrySecret and Repository as the seed writes them, with only the
#      domain pointed at that registry and insecure: true (no placement: the Repository goes to
#      every cluster that admits its namespace), and shows the sync happening (`imgfleet watch`);
#   6. pulls the image's manifest from the agent's mirror with skopeo, checks its digest is
#      the upstream's, and prints how to pull from the mirror.
#
# Then it keeps everything running until Ctrl-C, unless --exit (or QUICKSTART_EXIT=1) is
# given: then it stops everything and exits 0 on success. Everything lives in ./quickstart
# (recreated on each run); logs are in ./quickstart/logs. Only 127.0.0.1 is used.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

EXIT_AT_END=${QUICKSTART_EXIT:-0}
for arg in "$@"; do
  case $arg in
    --exit) EXIT_AT_END=1 ;;
    -h | --help)
      sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
      echo "usage: bash scripts/quickstart.sh [--exit]"
      exit 0
      ;;
    *)
      echo "quickstart: unknown argument $arg; expected --exit or --help" >&2
      exit 64
      ;;
  esac
done

QS=$ROOT/quickstart
LOGS=$QS/logs
TARGET=${CARGO_TARGET_DIR:-target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=$TARGET/debug
REG_USER=admin
REG_PASSWORD=Harbor12345

BOLD="" PLAIN=""
if [ -t 1 ]; then
  BOLD=$(printf '\033[1m') PLAIN=$(printf '\033[0m')
fi
step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
note() { printf '    %s\n' "$*"; }
die() {
  printf '\nquickstart: %s\n' "$*" >&2
  exit 1
}

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
trap cleanup EXIT
trap 'echo; echo "stopping..."; exit 130' INT TERM

# pick_port VAR: sets VAR to a free 127.0.0.1 port (nothing answers a connect on it) that
# was not picked before. Not run in a subshell, so that USED_PORTS remembers every pick.
USED_PORTS=" "
pick_port() {
  local p i
  for i in $(seq 1 500); do
    p=$((20000 + RANDOM % 30000))
    case $USED_PORTS in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED_PORTS="$USED_PORTS$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free 127.0.0.1 port found"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for WHAT SECONDS PID LOG CMD...: runs CMD every 0.2 s until it succeeds; fails when
# the time is up or process PID (the component being waited for) has exited.
wait_for() {
  local what=$1 secs=$2 pid=$3 log=$4
  shift 4
  local deadline=$((SECONDS + secs)) why=""
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      why="the process exited first"
    elif [ "$SECONDS" -ge "$deadline" ]; then
      why="it did not happen within ${secs}s"
    fi
    if [ -n "$why" ]; then
      echo "quickstart: waiting for $what: $why; last lines of ${log#"$ROOT"/}:" >&2
      tail -n 30 "$log" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

# http_is CODE URL [curl args]: whether GET URL answers with status CODE.
http_is() {
  local want=$1 url=$2
  shift 2
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url")" = "$want" ]
}

start() { # start NAME CMD...: runs CMD in the background with its output in logs/NAME.log
  local name=$1
  shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  PIDS+=("$!")
}

alive() { kill -0 "$1" 2>/dev/null; }

step "Installing missing components (docker-registry, skopeo, etcd, protoc, htpasswd)"
bash scripts/install-deps.sh

step "Building imgfleet (debug). The first build takes a few minutes."
cargo build --workspace --bins
for b in imgfleet imgfleet-hub imgfleet-agent imgfleet-sample; do
  [ -x "$BIN/$b" ] || die "$BIN/$b was not built"
done

rm -rf "$QS"
mkdir -p "$LOGS"

step "Starting the upstream registry (docker-registry, basic auth $REG_USER/$REG_PASSWORD)"
pick_port REG_PORT
mkdir -p "$QS/registry/storage"
htpasswd -Bbn "$REG_USER" "$REG_PASSWORD" >"$QS/registry/htpasswd"
cat >"$QS/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $QS/registry/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$REG_PORT
  secret: imgfleet-quickstart
auth:
  htpasswd:
    realm: imgfleet-quickstart
    path: $QS/registry/htpasswd
EOF
REGISTRY=$(command -v docker-registry || echo /usr/bin/docker-registry)
start registry "$REGISTRY" serve "$QS/registry/config.yml"
REG_PID=${PIDS[-1]}
wait_for "the registry answering on 127.0.0.1:$REG_PORT" 30 "$REG_PID" "$LOGS/registry.log" \
  http_is 401 "http://127.0.0.1:$REG_PORT/v2/"
note "registry: http://127.0.0.1:$REG_PORT (log: quickstart/logs/registry.log)"

step "Pushing a generated sample image to 127.0.0.1:$REG_PORT/library/nginx:latest"
UPSTREAM_DIGEST=$("$BIN/imgfleet-sample" --registry "127.0.0.1:$REG_PORT" --repo library/nginx \
  --tag latest --user "$REG_USER" --password "$REG_PASSWORD")
note "pushed library/nginx:latest = $UPSTREAM_DIGEST"

step "Starting the hub on its embedded store (quickstart/hub)"
pick_port HUB_PORT
pick_port HUB_METRICS_PORT
export IMGFLEET_HUB="https://127.0.0.1:$HUB_PORT"
export IMGFLEET_CREDENTIALS="$QS/hub/admin"
start hub env RUST_LOG=info "$BIN/imgfleet-hub" --listen "127.0.0.1:$HUB_PORT" \
  --metrics-listen "127.0.0.1:$HUB_METRICS_PORT" --data-dir "$QS/hub"
HUB_PID=${PIDS[-1]}
wait_for "the hub writing its admin credentials" 60 "$HUB_PID" "$LOGS/hub.log" test -f "$QS/hub/admin/key.pem"
wait_for "the hub answering imgfleet get clusters" 60 "$HUB_PID" "$LOGS/hub.log" "$BIN/imgfleet" get clusters
note "hub: $IMGFLEET_HUB (admin credentials: quickstart/hub/admin, log: quickstart/logs/hub.log)"
note "the imgfleet commands below use IMGFLEET_HUB and IMGFLEET_CREDENTIALS"

step "Enrolling cluster edge-1"
(set -x; "$BIN/imgfleet" cluster enroll edge-1 --label region=lab --namespace default --out "$QS/edge-1")

step "Starting edge-1's agent (quickstart/agent)"
MIRROR_PORT=5050
port_free "$MIRROR_PORT" || pick_port MIRROR_PORT
pick_port AGENT_METRICS_PORT
MIRROR="127.0.0.1:$MIRROR_PORT"
start agent env RUST_LOG=info "$BIN/imgfleet-agent" --hub "$IMGFLEET_HUB" \
  --credentials "$QS/edge-1" --data-dir "$QS/agent" --mirror-listen "$MIRROR" \
  --metrics-listen "127.0.0.1:$AGENT_METRICS_PORT"
AGENT_PID=${PIDS[-1]}
wait_for "the agent's mirror answering on $MIRROR" 60 "$AGENT_PID" "$LOGS/agent.log" http_is 200 "http://$MIRROR/v2/"
note "mirror: http://$MIRROR (log: quickstart/logs/agent.log)"

step "Applying the seed's RegistrySecret and Repository, pointed at the local registry"
# The seed's two objects exactly as the seed document writes them (src/model/testdata holds
# its YAML blocks byte for byte), with only the registry's domain changed and insecure: true
# added, because this lab registry speaks plain HTTP. The Repository has no placement: it
# goes to every cluster that admits its namespace, here edge-1 (enrolled for "default").
sed -e "s|domain: \"harbor.example.com\"|domain: \"127.0.0.1:$REG_PORT\"\n  insecure: true|" \
  src/model/testdata/seed-quickstart-registrysecret.yaml >"$QS/policy.yaml"
grep -q "insecure: true" "$QS/policy.yaml" || die "could not point the seed's RegistrySecret at the local registry"
{ echo "---"; cat src/model/testdata/seed-quickstart-repository.yaml; } >>"$QS/policy.yaml"
note "quickstart/policy.yaml: the seed's objects with domain 127.0.0.1:$REG_PORT and insecure: true"
sed 's/^/      /' "$QS/policy.yaml"
(set -x; "$BIN/imgfleet" apply -f "$QS/policy.yaml")

step "Watching the sync (imgfleet watch repository nginx-latest --until-synced)"
if ! "$BIN/imgfleet" watch repository nginx-latest --until-synced --timeout 5m; then
  alive "$HUB_PID" || echo "the hub exited; see quickstart/logs/hub.log" >&2
  alive "$AGENT_PID" || echo "the agent exited; see quickstart/logs/agent.log" >&2
  die "nginx-latest did not sync; logs are in quickstart/logs"
fi

step "Status on the hub"
(set -x; "$BIN/imgfleet" get repositories)
(set -x; "$BIN/imgfleet" get clusters)

step "Pulling from the mirror"
(set -x; skopeo inspect --tls-verify=false "docker://$MIRROR/library/nginx:latest" --format '{{.Digest}}') \
  >"$QS/mirror-digest.txt" || die "skopeo could not read library/nginx:latest from the mirror"
MIRROR_DIGEST=$(tr -d '[:space:]' <"$QS/mirror-digest.txt")
UPSTREAM_SKOPEO=$(skopeo inspect --tls-verify=false --creds "$REG_USER:$REG_PASSWORD" \
  --format '{{.Digest}}' "docker://127.0.0.1:$REG_PORT/library/nginx:latest")
note "mirror   $MIRROR/library/nginx:latest = $MIRROR_DIGEST"
note "upstream 127.0.0.1:$REG_PORT/library/nginx:latest = $UPSTREAM_SKOPEO"
if [ "$MIRROR_DIGEST" != "$UPSTREAM_DIGEST" ] || [ "$UPSTREAM_SKOPEO" != "$UPSTREAM_DIGEST" ]; then
  die "digest mismatch: pushed $UPSTREAM_DIGEST, mirror $MIRROR_DIGEST, upstream $UPSTREAM_SKOPEO"
fi
note "the digests match: the mirror serves the upstream image byte for byte"

# The lab registry speaks plain HTTP: http:// makes containerd fall back to it
# over HTTP when the mirror is down.
"$BIN/imgfleet-agent" hosts-toml --mirror "http://$MIRROR" --upstream "http://127.0.0.1:$REG_PORT" \
  >"$QS/hosts.toml"
"$BIN/imgfleet-agent" hosts-toml --mirror "http://$MIRROR" --upstream "http://127.0.0.1:$REG_PORT" \
  --out-dir "$QS/certs.d" >/dev/null

cat <<EOF

${BOLD}Done: edge-1's agent holds library/nginx:latest and serves it from its mirror.$PLAIN

Pull from the mirror:
  skopeo inspect --tls-verify=false docker://$MIRROR/library/nginx:latest
  skopeo copy --src-tls-verify=false docker://$MIRROR/library/nginx:latest oci:/tmp/nginx:latest

Point containerd on a node at the mirror: save this as
/etc/containerd/certs.d/127.0.0.1:$REG_PORT/hosts.toml (written to quickstart/hosts.toml),
with config_path = "/etc/containerd/certs.d" in containerd's CRI registry config:
$(sed 's/^/  /' "$QS/hosts.toml")
The same file in containerd's layout is in quickstart/certs.d; as root, with containerd running:
  ctr image pull --hosts-dir quickstart/certs.d 127.0.0.1:$REG_PORT/library/nginx:latest
(the mirror needs no login; a fallback to the upstream needs --user $REG_USER:<password>)

Talk to the hub (in another shell):
  export IMGFLEET_HUB=$IMGFLEET_HUB IMGFLEET_CREDENTIALS=$IMGFLEET_CREDENTIALS
  ${BIN#"$ROOT"/}/imgfleet get repositories
  ${BIN#"$ROOT"/}/imgfleet describe repository nginx-latest
  ${BIN#"$ROOT"/}/imgfleet get clusters
  ${BIN#"$ROOT"/}/imgfleet watch repository nginx-latest

Logs: quickstart/logs/{registry,hub,agent}.log
EOF

if [ "$EXIT_AT_END" = 1 ]; then
  step "Stopping (--exit)"
  cleanup
  echo "quickstart: success"
  exit 0
fi

echo
echo "Everything keeps running; press Ctrl-C to stop the hub, the agent and the registry."
while alive "$HUB_PID" && alive "$AGENT_PID" && alive "$REG_PID"; do
  sleep 1
done
alive "$HUB_PID" || echo "the hub exited; see quickstart/logs/hub.log" >&2
alive "$AGENT_PID" || echo "the agent exited; see quickstart/logs/agent.log" >&2
alive "$REG_PID" || echo "the registry exited; see quickstart/logs/registry.log" >&2
exit 1

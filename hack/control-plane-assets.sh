#!/usr/bin/env bash
# Obtains the binaries of Roster's local control plane at pinned versions and prints where they are.
#
#   hack/control-plane-assets.sh NAME...     NAME: etcd kube-apiserver kube-controller-manager helm
#
# For each NAME, in this order: $KUBEBUILDER_ASSETS/NAME if that variable is set (what envtest users
# already have), else the per-version cache outside the repository, else a build from the published
# Go modules (the only source this machine can reach), which then fills the cache.
# Prints one line per binary, `NAME=/absolute/path`; all progress goes to stderr.
#
# Why a wrapper module: `go install k8s.io/kubernetes/cmd/...@vX` refuses modules with replace
# directives (kubernetes/kubernetes#79384), so the Kubernetes binaries are built from a small module
# that requires k8s.io/kubernetes and replaces each of its staging modules with the published tag.
set -euo pipefail

# Pinned versions: the newest patches the Go module proxy serves (checked 2026-11-21).
KUBERNETES_VERSION=v1.36.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v4.3.1

CACHE_ROOT="${ROSTER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/roster}"
CACHE_ROOT=$(realpath -m "$CACHE_ROOT") # absolute: the builds run in other directories
# -modcacherw: a module cache that `rm -rf` can remove.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -modcacherw"
# Module and build caches of our own, so `du` of CACHE_ROOT is the whole cost on disk.
export GOMODCACHE="$CACHE_ROOT/go/mod" GOCACHE="$CACHE_ROOT/go/build"

log() { printf 'control-plane-assets: %s\n' "$*" >&2; }

version_of() {
  case "$1" in
    etcd) echo "$ETCD_VERSION" ;;
    kube-apiserver|kube-controller-manager) echo "$KUBERNETES_VERSION" ;;
    helm) echo "$HELM_VERSION" ;;
    *) log "unknown binary '$1' (expected etcd, kube-apiserver, kube-controller-manager or helm)"; exit 2 ;;
  esac
}

# A fresh wrapper module in a temporary directory; removed on exit.
workdir=""
cleanup() { if [ -n "$workdir" ]; then rm -rf "$workdir"; fi; }
trap cleanup EXIT
new_module() {
  workdir=$(mktemp -d "${TMPDIR:-/tmp}/roster-assets.XXXXXX")
  cd "$workdir"
  go mod init roster.dev/assets >/dev/null 2>&1
}

build_kubernetes() { # $1 = binary name, $2 = output path
  new_module
  local gomod minor
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || { log "could not download k8s.io/kubernetes@$KUBERNETES_VERSION"; exit 1; }
  minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  # Every `k8s.io/<m> => ./staging/...` line of Kubernetes' go.mod names one module to replace.
  {
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/.*#\t\1 => \1 '"$staging"'#p' "$gomod"
    echo ")"
  } >> go.mod
  printf 'package tools\n\nimport _ "k8s.io/kubernetes/cmd/%s/app"\n' "$1" > tools.go
  go mod tidy >&2
  local ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean"
  done
  go build -ldflags "-s -w $ld" -o "$2" "k8s.io/kubernetes/cmd/$1"
}

build_etcd() {
  new_module
  printf 'package tools\n\nimport _ "go.etcd.io/etcd/server/v3/etcdmain"\n' > tools.go
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
  go mod tidy >&2
  go build -ldflags "-s -w" -o "$1" go.etcd.io/etcd/server/v3
}

build_helm() {
  new_module
  printf 'package tools\n\nimport _ "helm.sh/helm/v4/pkg/cmd"\n' > tools.go
  go get "helm.sh/helm/v4@$HELM_VERSION" >&2
  go mod tidy >&2
  go build -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" -o "$1" helm.sh/helm/v4/cmd/helm
}

[ $# -gt 0 ] || { log "usage: $0 NAME... (etcd kube-apiserver kube-controller-manager helm)"; exit 2; }
for name in "$@"; do
  version=$(version_of "$name")
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$name" ]; then
    echo "$name=$(cd "$KUBEBUILDER_ASSETS" && pwd)/$name"
    continue
  fi
  out="$CACHE_ROOT/bin/$name-$version/$name"
  mkdir -p "$(dirname "$out")"
  # One build per binary at a time (tests may start several control planes at once); whoever
  # waited finds the binary built.
  exec {lock}>"$out.lock"
  flock "$lock"
  if [ ! -x "$out" ]; then
    log "building $name $version from its Go module (cold: many minutes on 2 cores; cached after)"
    start=$(date +%s)
    # Build to a temporary name and rename, so an interrupted build never leaves a half binary.
    case "$name" in
      etcd) build_etcd "$out.partial" ;;
      helm) build_helm "$out.partial" ;;
      *) build_kubernetes "$name" "$out.partial" ;;
    esac
    mv "$out.partial" "$out"
    cleanup; workdir=""
    log "built $name $version in $(( $(date +%s) - start )) s"
  fi
  exec {lock}>&-
  echo "$name=$out"
done

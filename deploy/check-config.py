#!/usr/bin/env python3
"""Checks rendered manifests (kustomize output, the file given) against the regcache config
they ship: the ConfigMap's regcache.yaml passes `regcache check-config` (the binary given), and
the objects around it match what that config turns on, which no schema can see:
- TLS on: the probes use HTTPS, the ServiceMonitor scrapes https, node-config writes https
  entries and installs the CA; off: all plain HTTP.
- every file the config names lies under a volume mounted into the mirror container, and every
  Secret mounted there is named by the config (else a component's config was replaced);
- access control on: node-config sends the nodes' pull token; a rule for anonymous clients
  from networks allows exactly the node CIDRs of the NetworkPolicy;
- credentials.kubernetes on: the service account token is mounted and a Role grants
  get/list/watch on Secrets, limited by resourceNames to exactly the configured names (none
  when a label selector is used).
Usage: check-config.py RENDERED.yaml REGCACHE-BINARY"""
import os
import subprocess
import sys
import tempfile

import yaml


def main():
    rendered, binary = sys.argv[1], sys.argv[2]
    docs = [d for d in yaml.safe_load_all(open(rendered, encoding="utf-8")) if d]
    errors = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    [configmap] = [c for c in by_kind.get("ConfigMap", []) if "regcache.yaml" in c.get("data", {})]
    text = configmap["data"]["regcache.yaml"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        check = subprocess.run([binary, "check-config", "--config", f.name],
                               capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)
    if check.returncode != 0:
        errors.append(f"regcache check-config refuses the ConfigMap's regcache.yaml: {check.stderr.strip()}")
    config = yaml.safe_load(text) or {}
    tls = (config.get("tls") or {}).get("cert_file") is not None
    access = config.get("access") or {}
    kube = (config.get("credentials") or {}).get("kubernetes") or {}

    mirror = [w for kind in ("StatefulSet", "DaemonSet") for w in by_kind.get(kind, [])
              if w["metadata"]["name"] == "regcache"]
    for w in mirror:
        name = f"{w['kind']} {w['metadata']['name']}"
        pod = w["spec"]["template"]["spec"]
        container = pod["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            scheme = container[probe]["httpGet"].get("scheme", "HTTP")
            if scheme != ("HTTPS" if tls else "HTTP"):
                errors.append(f"{name}: {probe} uses {scheme} while TLS is {'on' if tls else 'off'}")
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        files = [config.get("tls", {}).get(k) for k in ("cert_file", "key_file", "client_ca_file")]
        files += [access.get(k) for k in ("htpasswd_file", "tokens_file", "signing_key_file")]
        files += (config.get("credentials") or {}).get("files") or []
        files = [str(f) for f in files if f]
        for path in files:
            if not any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts):
                errors.append(f"{name}: the config names {path}, which no volume mount holds")
        # A Secret mounted but named by no config key: the config of another component won.
        secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        for m in container.get("volumeMounts", []):
            path = m["mountPath"].rstrip("/")
            if m["name"] in secrets and not any(f == path or f.startswith(path + "/") for f in files):
                errors.append(f"{name}: Secret volume {m['name']} is mounted at {path}, but the config names no file there")
        if kube.get("enabled") and not pod.get("automountServiceAccountToken", True):
            errors.append(f"{name}: credentials.kubernetes is on but the service account token is not mounted")

    # node-config in the init containers of the mirror (node-local) or the wiring DaemonSet.
    for w in by_kind.get("DaemonSet", []):
        for init in w["spec"]["template"]["spec"].get("initContainers", []):
            args = init.get("args", [])
            if not args or args[0] != "node-config":
                continue
            name = f"DaemonSet {w['metadata']['name']} init container {init['name']}"
            mirror_arg = next((a for a in args if a.startswith("--mirror=")), "")
            if mirror_arg.startswith("--mirror=https://") != tls:
                errors.append(f"{name}: {mirror_arg} while TLS is {'on' if tls else 'off'}")
            if tls and not any(a.startswith("--install-mirror-ca=") for a in args):
                errors.append(f"{name}: TLS is on but node-config installs no CA for the node")
            has_token = any(a.startswith("--token-file=") for a in args)
            # Without a token the node can only pull as `anonymous`, by its address.
            anonymous_by_network = any(
                "anonymous" in rule.get("who", []) and rule.get("networks")
                for rule in access.get("rules", []))
            if access.get("enabled") and not has_token and not anonymous_by_network:
                errors.append(f"{name}: access control is on but node-config sends no pull token "
                              "and no anonymous rule admits the nodes' network")
            mounts = [m["mountPath"] for m in init.get("volumeMounts", [])]
            for a in args:
                if a.startswith(("--token-file=", "--install-mirror-ca=")):
                    path = a.split("=", 1)[1]
                    if not any(path.startswith(m.rstrip("/") + "/") for m in mounts):
                        errors.append(f"{name}: {a} names a file no volume mount holds")

    if access.get("enabled"):
        cidrs = set()
        for policy in by_kind.get("NetworkPolicy", []):
            if policy["metadata"]["name"] != "regcache":
                continue
            for rule in policy["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    if "ipBlock" in peer:
                        cidrs.add(peer["ipBlock"]["cidr"])
        for rule in access.get("rules", []):
            if "anonymous" in rule.get("who", []) and rule.get("networks"):
                if set(rule["networks"]) != cidrs:
                    errors.append(f"access.rules: anonymous pulls from {rule['networks']}, but the NetworkPolicy admits the node CIDRs {sorted(cidrs)}")

    for monitor in by_kind.get("ServiceMonitor", []):
        scheme = monitor["spec"]["endpoints"][0].get("scheme", "http")
        if scheme != ("https" if tls else "http"):
            errors.append(f"ServiceMonitor: scrapes {scheme} while TLS is {'on' if tls else 'off'}")

    if kube.get("enabled"):
        roles = [r for r in by_kind.get("Role", []) if any(
            "secrets" in rule.get("resources", []) for rule in r.get("rules", []))]
        if not roles:
            errors.append("credentials.kubernetes is on but no Role grants access to Secrets")
        for role in roles:
            for rule in role["rules"]:
                if "secrets" not in rule.get("resources", []):
                    continue
                if set(rule.get("verbs", [])) != {"get", "list", "watch"}:
                    errors.append(f"Role {role['metadata']['name']}: verbs {rule.get('verbs')}, need get, list, watch")
                names = sorted(kube.get("names") or [])
                granted = sorted(rule.get("resourceNames") or [])
                if names != granted:
                    errors.append(f"Role {role['metadata']['name']}: resourceNames {granted}, but credentials.kubernetes.names is {names}")

    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"config: accepted by regcache; TLS {'on' if tls else 'off'}, access control "
          f"{'on' if access.get('enabled') else 'off'}, Kubernetes credentials "
          f"{'on' if kube.get('enabled') else 'off'}; the manifests agree")


main()

#!/usr/bin/env python3
"""Checks rendered manifests (kustomize output on stdin or in the files given): every
Service, NetworkPolicy and PodDisruptionBudget selector picks the pods of at least one
workload, and every workload's selector matches its own pod template. A selector that matches
nothing applies without error and leaves a Service empty or pods unprotected, so schema
validation cannot see it."""
import sys

import yaml


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def main():
    docs = []
    for name in sys.argv[1:] or ["-"]:
        stream = sys.stdin if name == "-" else open(name, encoding="utf-8")
        docs += [d for d in yaml.safe_load_all(stream) if d]
    pods = []
    errors = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            labels = d["spec"]["template"]["metadata"].get("labels", {})
            own = d["spec"]["selector"].get("matchLabels", {})
            if not matches(own, labels):
                errors.append(f"{d['kind']} {d['metadata']['name']}: selector {own} misses its pods {labels}")
            pods.append((f"{d['kind']} {d['metadata']['name']}", labels))
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind == "Service":
            selector = d["spec"].get("selector")
        elif kind == "NetworkPolicy":
            selector = d["spec"]["podSelector"].get("matchLabels")
        elif kind == "PodDisruptionBudget":
            selector = d["spec"]["selector"].get("matchLabels")
        else:
            continue
        if not selector:
            continue
        if not any(matches(selector, labels) for _, labels in pods):
            errors.append(f"{kind} {name}: selector {selector} matches no workload's pods")
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"selectors: {len(pods)} workloads, every selector matches")


main()

#!/usr/bin/env python3
"""Checks the deployment material; run by .ci/validate-manifests, which installs what it needs.

    check_manifests.py manifests --kube-version 1.33.0 [...] NAME[@NAMESPACE]=RENDERED.yaml [...]
    check_manifests.py dashboard deploy/grafana/roster-dashboard.json
    check_manifests.py prometheus deploy/prometheus/prometheus.yml

`manifests` validates every object of each kustomize rendering against the Kubernetes JSON schemas
(strict: unknown fields fail) shipped by the kubernetes-validate package, for every Kubernetes
version given, reporting every violation. Then it checks what schemas cannot see: every object in
NAMESPACE (when given), selectors that select the pod templates, Services and probes naming ports
that exist, StatefulSets naming a headless Service, the HPA's target and CPU requests, and every
ConfigMap, Secret and claim referenced being rendered too (the Secrets roster-tls and roster-admin-token may be external:
the base and the prod overlay expect it to exist in the namespace).

`dashboard` checks the Grafana dashboard is well-formed and queries only the metrics the servers
export. `prometheus` checks the scrape configuration's shape.

Prints one line per object or check; exits 1 if anything failed.
"""

import json
import re
import sys

import yaml

# Secrets the manifests may reference without rendering them.
EXTERNAL_SECRETS = {"roster-tls", "roster-admin-token"}

# What the servers export at /metrics: the catalogue in docs/OPERATIONS.md (which the Rust test
# cli/tests/metrics_catalog.rs holds to what running servers export). Histograms also have
# _bucket, _sum and _count series.
def _catalogue():
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "docs", "OPERATIONS.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| `(roster_[a-z0-9_]+)` \| (\w+) \|", f.read(), re.M)
    if not rows:
        sys.exit("docs/OPERATIONS.md has no metrics table")
    names = {name for name, _ in rows}
    for name, kind in rows:
        if kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


METRICS = _catalogue()

failures = 0


def ok(message):
    print(f"  ok    {message}")


def fail(message):
    global failures
    failures += 1
    print(f"  FAIL  {message}")


# ---------------------------------------------------------------------------------------------
# Kubernetes objects


def kind_name(obj):
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def schema_errors(obj, version):
    """Every schema violation of `obj` for Kubernetes `version`, using the strict schemas (no
    unknown fields) that kubernetes-validate ships. Its own `validate` stops at the first error;
    this reports them all."""
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    minor = utils.major_minor(version)
    available = [v for v in utils.all_versions() if utils.major_minor(v) <= minor]
    if not available:
        return [f"Kubernetes {version} is older than any schema kubernetes-validate ships"]
    schema_dir = f"v{available[-1]}-local-strict"
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    try:
        schema = utils.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{obj['kind'].lower()}-{api}.json", version)
    except FileNotFoundError:
        return [f"no schema for {obj['kind']} {obj['apiVersion']}"]
    defs = utils.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    errors = []
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
        path = ".".join(str(p) for p in e.path) or "(top)"
        errors.append(f"{path}: {e.message}")
    return errors


def schema_check(rendering, obj, versions):
    where = f"{rendering}: {kind_name(obj)} ({obj.get('apiVersion')})"
    problems = [f"k8s {v}: {e}" for v in versions for e in schema_errors(obj, v)]
    for p in problems:
        fail(f"{where}: {p}")
    if not problems:
        ok(f"{where}: schema k8s {', '.join(versions)}")


def pod_template(obj):
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]
    return None


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(template):
    names, numbers = {}, set()
    for c in template["spec"].get("containers", []):
        for p in c.get("ports", []):
            if "name" in p:
                names[p["name"]] = (p["containerPort"], p.get("protocol", "TCP"))
            numbers.add((p["containerPort"], p.get("protocol", "TCP")))
    return names, numbers


def reference_checks(rendering, objs, namespace):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    workloads = [o for o in objs if pod_template(o) is not None]

    # Every namespaced object in an overlay lands in the overlay's namespace.
    if namespace is not None:
        for o in objs:
            if o["kind"] == "Namespace":
                continue
            ns = o["metadata"].get("namespace")
            if ns != namespace:
                fail(f"{rendering}: {kind_name(o)} is in namespace {ns!r}, not {namespace!r}")

    for w in workloads:
        t = pod_template(w)
        labels = t["metadata"].get("labels", {})
        sel = w["spec"].get("selector", {}).get("matchLabels", {})
        if not selects(sel, labels):
            fail(f"{rendering}: {kind_name(w)}: selector {sel} does not select its pod template {labels}")
        spec = t["spec"]
        names, _ = container_ports(t)
        # References to ConfigMaps, Secrets and volume claims.
        claim_templates = {v["metadata"]["name"] for v in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    ref_exists(rendering, w, "ConfigMap", ef["configMapRef"]["name"], by_kind)
                if "secretRef" in ef:
                    ref_exists(rendering, w, "Secret", ef["secretRef"]["name"], by_kind)
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                if "configMapKeyRef" in src:
                    ref_exists(rendering, w, "ConfigMap", src["configMapKeyRef"]["name"], by_kind)
                if "secretKeyRef" in src:
                    ref_exists(rendering, w, "Secret", src["secretKeyRef"]["name"], by_kind)
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    fail(f"{rendering}: {kind_name(w)}: container {c['name']} mounts unknown volume {m['name']}")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = (c.get(probe) or {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in names:
                    fail(f"{rendering}: {kind_name(w)}: {probe} names unknown port {port}")
        for v in volumes.values():
            if "configMap" in v:
                ref_exists(rendering, w, "ConfigMap", v["configMap"]["name"], by_kind)
            if "secret" in v:
                ref_exists(rendering, w, "Secret", v["secret"]["secretName"], by_kind)
            if "persistentVolumeClaim" in v:
                ref_exists(rendering, w, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], by_kind)
        # The scrape annotations point at the HTTP port.
        ann = t["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            port = ann.get("prometheus.io/port", "")
            if not port.isdigit() or (int(port), "TCP") not in container_ports(t)[1]:
                fail(f"{rendering}: {kind_name(w)}: prometheus.io/port {port!r} is no TCP container port")
        if w["kind"] == "StatefulSet":
            svc = by_kind.get("Service", {}).get(w["spec"].get("serviceName"))
            if svc is None or svc["spec"].get("clusterIP") != "None":
                fail(f"{rendering}: {kind_name(w)}: serviceName {w['spec'].get('serviceName')!r} is no headless Service")

    for svc in by_kind.get("Service", {}).values():
        sel = svc["spec"].get("selector", {})
        matched = [w for w in workloads if selects(sel, pod_template(w)["metadata"].get("labels", {}))]
        if not matched:
            fail(f"{rendering}: {kind_name(svc)}: selector {sel} selects no pod template")
            continue
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            proto = p.get("protocol", "TCP")
            for w in matched:
                names, numbers = container_ports(pod_template(w))
                found = names.get(target) if isinstance(target, str) else (
                    (target, proto) if (target, proto) in numbers else None)
                if found is None or found[1] != proto:
                    fail(f"{rendering}: {kind_name(svc)}: port {p.get('name')} -> {target}/{proto} is not a port of {kind_name(w)}")

    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        sel = pdb["spec"].get("selector", {}).get("matchLabels", {})
        if not any(selects(sel, pod_template(w)["metadata"].get("labels", {})) for w in workloads):
            fail(f"{rendering}: {kind_name(pdb)}: selector {sel} selects no pod template")

    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        target = by_kind.get(ref["kind"], {}).get(ref["name"])
        if target is None:
            fail(f"{rendering}: {kind_name(hpa)}: scale target {ref['kind']}/{ref['name']} is not rendered")
        elif "replicas" in target["spec"]:
            fail(f"{rendering}: {kind_name(hpa)}: {kind_name(target)} sets replicas, which would fight the autoscaler")
        for m in hpa["spec"].get("metrics", []):
            res = m.get("resource", {}).get("name")
            if res and target is not None:
                for c in pod_template(target)["spec"]["containers"]:
                    if res not in c.get("resources", {}).get("requests", {}):
                        fail(f"{rendering}: {kind_name(hpa)}: scales on {res} but {c['name']} requests none")


def ref_exists(rendering, owner, kind, name, by_kind):
    if name in by_kind.get(kind, {}):
        return
    if kind == "Secret" and name in EXTERNAL_SECRETS:
        return
    fail(f"{rendering}: {kind_name(owner)} references {kind} {name!r}, which is not rendered")


def manifests(args):
    versions, renderings = [], []
    it = iter(args)
    for a in it:
        if a == "--kube-version":
            versions.append(next(it))
        else:
            name, _, path = a.partition("=")
            name, _, namespace = name.partition("@")
            renderings.append((name, namespace or None, path))
    if not versions or not renderings:
        sys.exit("usage: check_manifests.py manifests --kube-version V [...] NAME[@NAMESPACE]=FILE [...]")
    total = 0
    for name, namespace, path in renderings:
        with open(path) as f:
            objs = [o for o in yaml.safe_load_all(f) if o]
        print(f"{name}: {len(objs)} objects ({path})")
        if not objs:
            fail(f"{name}: the rendering is empty")
        kinds = {}
        for o in objs:
            if not isinstance(o, dict) or "kind" not in o or "apiVersion" not in o:
                fail(f"{name}: a document without kind/apiVersion: {str(o)[:80]}")
                continue
            kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
            schema_check(name, o, versions)
            total += 1
        before = failures
        reference_checks(name, [o for o in objs if isinstance(o, dict) and "kind" in o], namespace)
        if failures == before:
            ok(f"{name}: selectors, ports, probes and references consistent "
               f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    return total


# ---------------------------------------------------------------------------------------------
# Grafana and Prometheus


def dashboard(path):
    with open(path) as f:
        d = json.load(f)
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in d:
            fail(f"{path}: no {key!r}")
    panels = []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []))

    walk(d.get("panels", []))
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        fail(f"{path}: panel ids missing or repeated")
    used = set()
    exprs = 0
    for p in panels:
        if p.get("type") == "row":
            continue
        targets = p.get("targets", [])
        if not targets:
            fail(f"{path}: panel {p.get('title')!r} has no query")
        if "gridPos" not in p:
            fail(f"{path}: panel {p.get('title')!r} has no gridPos")
        for t in targets:
            expr = t.get("expr", "")
            exprs += 1
            if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
                fail(f"{path}: panel {p.get('title')!r}: unbalanced query {expr}")
            for name in re.findall(r"\broster_[a-z0-9_]+", expr):
                used.add(name)
                if name not in METRICS:
                    fail(f"{path}: panel {p.get('title')!r} queries {name}, which the servers do not export")
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        for name in re.findall(r"\broster_[a-z0-9_]+", q):
            used.add(name)
            if name not in METRICS:
                fail(f"{path}: variable {v.get('name')!r} queries {name}, which the servers do not export")
    ok(f"{path}: {len(panels)} panels, {exprs} queries over {len(used)} metric series names, all exported")


def prometheus(path):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    jobs = cfg.get("scrape_configs") or []
    if not jobs:
        fail(f"{path}: no scrape_configs")
    actions = {"replace", "keep", "drop", "keepequal", "dropequal", "hashmod", "labelmap",
               "labeldrop", "labelkeep", "lowercase", "uppercase"}
    for job in jobs:
        name = job.get("job_name")
        if not name:
            fail(f"{path}: a scrape config without job_name")
        for rc in job.get("relabel_configs", []) + job.get("metric_relabel_configs", []):
            if rc.get("action", "replace") not in actions:
                fail(f"{path}: job {name}: unknown relabel action {rc.get('action')}")
            if "regex" in rc:
                try:
                    re.compile(rc["regex"])
                except re.error as e:
                    fail(f"{path}: job {name}: bad regex {rc['regex']!r}: {e}")
        ok(f"{path}: job {name}: {len(job.get('relabel_configs', []))} relabel rules")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    what, args = sys.argv[1], sys.argv[2:]
    if what == "manifests":
        total = manifests(args)
        print(f"{total} objects checked, {failures} problems")
    elif what == "dashboard":
        dashboard(args[0])
    elif what == "prometheus":
        prometheus(args[0])
    else:
        sys.exit(__doc__)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

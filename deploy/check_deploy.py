#!/usr/bin/env python3
"""Offline structural checks of deploy/: the compose file and the
Kubernetes manifests (no Docker engine, no cluster, no network).

Not a full schema validation: it checks what would make these files fail
to start plangate or silently misbehave — wrong references between
objects, missing required fields, the Garnet flags, probes on the right
paths, ConfigMaps mounted without subPath — and extracts the ConfigMap's
plangate.toml and plans.yaml into OUT_DIR so that `plangate check-config`
can validate them (deploy/check.sh does).

Usage: check_deploy.py DEPLOY_DIR OUT_DIR
Exit 0 when everything holds, 1 with one line per problem otherwise.
"""

import os
import re
import sys

import yaml

problems = []


def fail(where, msg):
    problems.append(f"{where}: {msg}")


def need(obj, path, where):
    """obj at dotted `path`, or record a problem and return None."""
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            fail(where, f"missing {path}")
            return None
        cur = cur[part]
    return cur


# ---------------------------------------------------------------- compose

COMPOSE_SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file",
    "ports", "volumes", "depends_on", "healthcheck", "restart", "ulimits",
    "networks", "labels", "deploy", "user", "working_dir", "expose",
    "pull_policy",
}
DEPENDS_CONDITIONS = {
    "service_started", "service_healthy", "service_completed_successfully",
}


def check_compose(deploy_dir):
    path = os.path.join(deploy_dir, "docker-compose.yml")
    where = "docker-compose.yml"
    with open(path) as f:
        doc = yaml.safe_load(f)
    services = need(doc, "services", where)
    if not isinstance(services, dict) or not services:
        fail(where, "no services")
        return
    declared_volumes = set((doc.get("volumes") or {}).keys())
    for wanted in ("postgres", "garnet", "migrate", "plangate", "upstream"):
        if wanted not in services:
            fail(where, f"service {wanted} missing")
    for name, svc in services.items():
        w = f"{where}: services.{name}"
        if not isinstance(svc, dict):
            fail(w, "not a mapping")
            continue
        for key in svc:
            if key not in COMPOSE_SERVICE_KEYS:
                fail(w, f"unknown key {key}")
        if "image" not in svc and "build" not in svc:
            fail(w, "needs image or build")
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = os.path.normpath(os.path.join(deploy_dir, build.get("context", ".")))
            dockerfile = os.path.join(ctx, build.get("dockerfile", "Dockerfile"))
            if not os.path.isfile(dockerfile):
                fail(w, f"build.dockerfile {dockerfile} does not exist")
        deps = svc.get("depends_on") or {}
        dep_items = deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)
        for dep, cond in dep_items:
            if dep not in services:
                fail(w, f"depends_on unknown service {dep}")
            c = (cond or {}).get("condition", "service_started")
            if c not in DEPENDS_CONDITIONS:
                fail(w, f"depends_on.{dep}: unknown condition {c}")
            if c == "service_healthy" and "healthcheck" not in services.get(dep, {}):
                fail(w, f"waits for {dep} to be healthy but {dep} has no healthcheck")
        for p in svc.get("ports") or []:
            if not re.fullmatch(r"(\d+\.\d+\.\d+\.\d+:)?\d+(:\d+)?(/(tcp|udp))?", str(p)):
                fail(w, f"bad port mapping {p!r}")
        for v in svc.get("volumes") or []:
            src = str(v).split(":")[0]
            if src.startswith(".") or src.startswith("/"):
                if not os.path.exists(os.path.normpath(os.path.join(deploy_dir, src))):
                    fail(w, f"bind mount source {src} does not exist")
            elif src not in declared_volumes:
                fail(w, f"volume {src} is not declared under volumes:")
        env = svc.get("environment") or {}
        if isinstance(env, dict):
            for k, val in env.items():
                # Service hostnames in URLs must be services of this file.
                m = re.match(r"^[a-z]+://(?:[^@/]*@)?([A-Za-z0-9_.-]+)", str(val))
                if m and "." not in m.group(1) and m.group(1) not in services:
                    fail(w, f"environment.{k} points at unknown host {m.group(1)}")
    garnet = services.get("garnet", {})
    cmd = garnet.get("command") or []
    cmd = cmd.split() if isinstance(cmd, str) else cmd
    for flag in ("--lua", "--lua-transaction-mode"):
        if flag not in cmd:
            fail(f"{where}: services.garnet", f"command lacks {flag} (scripts would not be atomic)")
    migrate = services.get("migrate", {})
    if "migrate" not in (migrate.get("command") or []):
        fail(f"{where}: services.migrate", "does not run `plangate migrate`")
    gw_deps = services.get("plangate", {}).get("depends_on") or {}
    if (gw_deps.get("migrate") or {}).get("condition") != "service_completed_successfully":
        fail(f"{where}: services.plangate", "must wait for migrate to complete successfully")


# ------------------------------------------------------------- kubernetes

K8S_KINDS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Job": "batch/v1",
    "PodDisruptionBudget": "policy/v1",
}
QUANTITY = re.compile(r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_pod_spec(pod, where, objs):
    containers = need(pod, "containers", where) or []
    if not containers:
        fail(where, "no containers")
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    for c in containers:
        cw = f"{where}.containers[{c.get('name')}]"
        for key in ("name", "image"):
            need(c, key, cw)
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for k, q in (res.get(kind) or {}).items():
                if not QUANTITY.match(str(q)):
                    fail(cw, f"resources.{kind}.{k}: bad quantity {q!r}")
        if "requests" not in res:
            fail(cw, "no resource requests")
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(cw, "securityContext.allowPrivilegeEscalation must be false")
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                secret = objs.get(("Secret", ref.get("name")))
                if secret is None:
                    fail(cw, f"env {e.get('name')}: unknown Secret {ref.get('name')}")
                else:
                    keys = set((secret.get("stringData") or {}).keys()) | set(
                        (secret.get("data") or {}).keys())
                    if ref.get("key") not in keys:
                        fail(cw, f"env {e.get('name')}: Secret {ref.get('name')} has no key {ref.get('key')}")
        port_names = {p.get("name") for p in c.get("ports") or []}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            p = c.get(probe)
            if p and "httpGet" in p:
                port = p["httpGet"].get("port")
                if isinstance(port, str) and port not in port_names:
                    fail(cw, f"{probe}: port {port} is not a named container port")
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                fail(cw, f"volumeMount {m.get('name')}: no such volume")
            vol = volumes.get(m.get("name"), {})
            if "configMap" in vol and "subPath" in m:
                fail(cw, f"volumeMount {m.get('name')}: a ConfigMap mounted with subPath never sees updates")
    for name, v in volumes.items():
        if "configMap" in v and ("ConfigMap", v["configMap"].get("name")) not in objs:
            fail(where, f"volume {name}: unknown ConfigMap {v['configMap'].get('name')}")


def check_k8s(deploy_dir, out_dir):
    k8s = os.path.join(deploy_dir, "k8s")
    objs = {}
    files = sorted(f for f in os.listdir(k8s) if f.endswith(".yaml"))
    kustomization = None
    for fname in files:
        with open(os.path.join(k8s, fname)) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        for d in docs:
            where = f"k8s/{fname}"
            if d.get("kind") == "Kustomization":
                kustomization = (fname, d)
                continue
            kind = d.get("kind")
            if kind not in K8S_KINDS:
                fail(where, f"unexpected kind {kind}")
                continue
            if d.get("apiVersion") != K8S_KINDS[kind]:
                fail(where, f"{kind} needs apiVersion {K8S_KINDS[kind]}, has {d.get('apiVersion')}")
            name = need(d, "metadata.name", where)
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(name)):
                fail(where, f"bad metadata.name {name!r}")
            if (kind, name) in objs:
                fail(where, f"duplicate {kind} {name}")
            objs[(kind, name)] = d
            d["_file"] = fname
    if kustomization:
        listed = set(kustomization[1].get("resources") or [])
        for fname in files:
            if fname != kustomization[0] and fname not in listed:
                fail(f"k8s/{kustomization[0]}", f"does not list {fname}")
        for r in listed:
            if r not in files:
                fail(f"k8s/{kustomization[0]}", f"lists missing {r}")

    deployments = [d for (k, _), d in objs.items() if k == "Deployment"]
    if len(deployments) != 1:
        fail("k8s", f"expected one Deployment, found {len(deployments)}")
    for d in deployments:
        w = f"k8s/{d['_file']}"
        spec = d.get("spec") or {}
        if (spec.get("replicas") or 1) < 2:
            fail(w, "needs at least 2 replicas")
        sel = need(spec, "selector.matchLabels", w) or {}
        tlabels = need(spec, "template.metadata.labels", w) or {}
        if not sel or not labels_match(sel, tlabels):
            fail(w, "selector does not match the pod template labels")
        pod = need(spec, "template.spec", w) or {}
        check_pod_spec(pod, f"{w}: pod", objs)
        c = (pod.get("containers") or [{}])[0]
        if (c.get("readinessProbe") or {}).get("httpGet", {}).get("path") != "/readyz":
            fail(w, "readinessProbe must GET /readyz")
        if (c.get("livenessProbe") or {}).get("httpGet", {}).get("path") != "/healthz":
            fail(w, "livenessProbe must GET /healthz")
        for (k, n), o in objs.items():
            if k == "Service":
                ssel = (o.get("spec") or {}).get("selector") or {}
                if not ssel or not labels_match(ssel, tlabels):
                    fail(f"k8s/{o['_file']}", "Service selector does not select the gateway pods")
                names = {p.get("name") for p in c.get("ports") or []}
                for p in (o.get("spec") or {}).get("ports") or []:
                    tp = p.get("targetPort")
                    if isinstance(tp, str) and tp not in names:
                        fail(f"k8s/{o['_file']}", f"targetPort {tp} is not a container port")
            if k == "PodDisruptionBudget":
                psel = need(o, "spec.selector.matchLabels", f"k8s/{o['_file']}") or {}
                if not labels_match(psel, tlabels):
                    fail(f"k8s/{o['_file']}", "PDB selector does not select the gateway pods")
                ma = (o.get("spec") or {}).get("minAvailable")
                if isinstance(ma, int) and ma >= (spec.get("replicas") or 1):
                    fail(f"k8s/{o['_file']}", "minAvailable >= replicas blocks every drain")

    jobs = [o for (k, _), o in objs.items() if k == "Job"]
    if not jobs:
        fail("k8s", "no migrate Job")
    for j in jobs:
        w = f"k8s/{j['_file']}"
        pod = need(j, "spec.template.spec", w) or {}
        if pod.get("restartPolicy") not in ("OnFailure", "Never"):
            fail(w, "a Job's restartPolicy must be OnFailure or Never")
        check_pod_spec(pod, f"{w}: pod", objs)
        if "migrate" not in ((pod.get("containers") or [{}])[0].get("args") or []):
            fail(w, "does not run `plangate migrate`")

    cm = objs.get(("ConfigMap", "plangate-config"))
    if cm is None:
        fail("k8s", "no ConfigMap plangate-config")
    else:
        data = cm.get("data") or {}
        for key in ("plangate.toml", "plans.yaml"):
            if key not in data:
                fail(f"k8s/{cm['_file']}", f"data lacks {key}")
            else:
                with open(os.path.join(out_dir, key), "w") as f:
                    f.write(data[key])


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    deploy_dir, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    check_compose(deploy_dir)
    check_k8s(deploy_dir, out_dir)
    for p in problems:
        print(f"deploy check: {p}", file=sys.stderr)
    if problems:
        return 1
    print("deploy check: docker-compose.yml and k8s/ manifests are consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())

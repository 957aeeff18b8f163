"""Renders helm/gateway with several value sets and checks the result.

Run by helm/test.sh (which installs the tools); arguments: the chart
directory and the venv's bin directory. Prints each check and exits 1 when
any failed.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tomllib

import helm_python as helm
import yaml

CHART, BIN = sys.argv[1], sys.argv[2]
KUBE_VERSIONS = ["1.30.0", "1.37.0"]  # the chart's minimum (preStop sleep) and the newest schema
NOT_VALIDATED = {"ServiceMonitor", "PrometheusRule"}  # CRDs: kubernetes-validate has no schema for them

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


CLUSTER = {
    "replicaCount": 3,
    "nats": {"url": "nats://nats-0.nats:4222,nats://nats-1.nats:4222,nats://nats-2.nats:4222"},
    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12, "targetConnectionsPerPod": 15000},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "dashboard": {"enabled": True}, "prometheusRule": {"enabled": True, "labels": {"release": "prom"}}},
    "jwt": {"existingSecret": "chat-jwt", "existingSecretKey": "hs256", "issuer": ["https://kc/realms/chat"]},
    "drain": {"timeoutMs": 30000, "spreadMs": 10000, "preStopSleepSeconds": 10},
    "updateStrategy": {"maxSurge": "25%"},
    "config": {
        "max_connections": 18000,
        "ephemeral_prefixes": ["typing:"],
        "allow_no_origin": False,
        "room_limits": {"ann": {"publish_per_sec": 1, "publish_burst": 1}},
    },
}
TLS = {
    "tls": {"enabled": True, "secretName": "chat-tls"},
    "jwt": {"hs256": False, "jwks": "https://kc/realms/chat/protocol/openid-connect/certs",
            "publicKeySecret": "chat-keys", "publicKeyFiles": ["a.pem", "b.pem"]},
    "allowedOrigins": ["https://chat.example.com"],
    "metrics": {"separatePort": False, "serviceMonitor": {"enabled": True}},
}
VALUE_SETS = {"default": {}, "cluster": CLUSTER, "tls": TLS}

# Values that must not render, and a phrase the error must contain.
MUST_FAIL = {
    "replicas>1 without nats.url": ({"replicaCount": 3}, "nats.url is required"),
    "autoscaling without nats.url": ({"autoscaling": {"enabled": True}}, "nats.url is required"),
    "tls without a secret": ({"tls": {"enabled": True}}, "tls.secretName"),
    "no verification key": ({"jwt": {"hs256": False}}, "no token verification key"),
    "chart-managed key in config": ({"config": {"node_id": "x"}}, "config.node_id is set by the chart"),
    "jwt.secret under 32 bytes": ({"jwt": {"secret": "short-secret"}}, "at least 32 bytes"),
}


def render(chart, values):
    out = chart.render(values, name="chat", namespace="chat", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return out, docs


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def assert_rendered(label, docs):
    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deps = by_kind.get("Deployment", [])
    check(len(deps) == 1, f"{label}: one Deployment")
    if not deps:
        return by_kind
    dep = deps[0]
    pod = dep["spec"]["template"]["spec"]
    ru = dep["spec"]["strategy"]["rollingUpdate"]
    check(ru["maxUnavailable"] == 0, f"{label}: rollingUpdate.maxUnavailable is 0 (got {ru['maxUnavailable']})")
    sc = pod["securityContext"]
    check(sc.get("runAsNonRoot") is True, f"{label}: pod runAsNonRoot")
    check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label}: seccomp RuntimeDefault")
    grace = pod["terminationGracePeriodSeconds"]
    for c in pod["containers"]:
        name = f"{label}: container {c['name']}"
        env = env_of(c)
        node_id = env.get("GATEWAY_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        check(node_id == "metadata.name", f"{name}: GATEWAY_NODE_ID from metadata.name")
        timeout_ms = int(env["GATEWAY_DRAIN_TIMEOUT_MS"]["value"])
        spread_ms = int(env["GATEWAY_DRAIN_SPREAD_MS"]["value"])
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        need = (timeout_ms + spread_ms) / 1000 + pre_stop
        check(grace >= need,
              f"{name}: terminationGracePeriodSeconds {grace} >= (drain {timeout_ms} + spread {spread_ms}) / 1000 + preStop {pre_stop} = {need:g}")
        check(grace > need, f"{name}: grace period leaves a margin over the drain ({grace} > {need:g})")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{name}: readiness probe on /readyz")
        check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{name}: liveness probe on /healthz")
        check("startupProbe" in c, f"{name}: has a startupProbe")
        csc = c["securityContext"]
        check(csc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem")
        check(csc.get("allowPrivilegeEscalation") is False, f"{name}: no privilege escalation")
        check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: drops ALL capabilities")
        check(bool(c.get("resources", {}).get("requests")), f"{name}: resource requests set")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    check(len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == 1, f"{label}: PDB maxUnavailable 1")
    svcs = by_kind.get("Service", [])
    check(len(svcs) == 1 and svcs[0]["spec"]["type"] == "ClusterIP", f"{label}: one ClusterIP Service")
    return by_kind


def main() -> int:
    started = time.monotonic()
    print(f"helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__})")

    # 1. helm lint --strict, with the defaults and with the cluster values.
    for label, values in [("default", None), ("cluster", CLUSTER)]:
        report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
        bad = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
        for m in bad:
            print(f"     lint {label}: {m}")
        check(not bad, f"helm lint --strict ({label} values)")

    # 2. yamllint on values.yaml and Chart.yaml.
    lint_cfg = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, comments-indentation: disable}}"
    r = subprocess.run([f"{BIN}/yamllint", "-s", "-d", lint_cfg, f"{CHART}/values.yaml", f"{CHART}/Chart.yaml"],
                       capture_output=True, text=True)
    print(r.stdout, end="")
    check(r.returncode == 0, "yamllint values.yaml and Chart.yaml")

    with helm.Chart.load(CHART) as chart, tempfile.TemporaryDirectory() as tmp:
        files = []
        rendered = {}
        for label, values in VALUE_SETS.items():
            try:
                out, docs = render(chart, values)
            except helm.HelmError as e:
                check(False, f"{label}: renders ({e})")
                continue
            check(True, f"{label}: renders")
            rendered[label] = assert_rendered(label, docs)
            for i, (path, doc) in enumerate(docs):
                if doc["kind"] in NOT_VALIDATED:
                    print(f"skip {label}: {doc['kind']} {doc['metadata']['name']} (CRD, no schema)")
                    continue
                f = os.path.join(tmp, f"{label}-{i:02d}-{doc['kind']}.yaml")
                with open(f, "w") as fh:
                    yaml.safe_dump(doc, fh, sort_keys=False)
                files.append(f)
            # The rendered text as Helm emits it, for yamllint.
            raw = os.path.join(tmp, f"{label}-raw.yaml")
            with open(raw, "w") as fh:
                fh.write("\n---\n".join(t for p, t in sorted(out.items()) if not p.endswith("NOTES.txt") and t.strip()))
            r = subprocess.run([f"{BIN}/yamllint", "-s", "-d",
                                "{extends: default, rules: {line-length: {max: 160}, document-start: disable,"
                                " indentation: {indent-sequences: whatever}, empty-lines: disable, comments-indentation: disable}}",
                                raw], capture_output=True, text=True)
            print(r.stdout, end="")
            check(r.returncode == 0, f"{label}: yamllint on the rendered manifests")

        # 3. kubernetes-validate --strict on every rendered manifest.
        for kv in KUBE_VERSIONS:
            r = subprocess.run([f"{BIN}/kubernetes-validate", "--strict", "--quiet", "-k", kv, *files],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stdout + r.stderr)
            check(r.returncode == 0, f"kubernetes-validate --strict -k {kv} on {len(files)} manifests")

    # 4. Facts of each value set.
    d = rendered.get("default", {})
    if d:
        dep = d["Deployment"][0]
        env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        check(grace == 5 + math.ceil((10000 + 2000) / 1000) + 5, f"default: grace period 22 s (got {grace})")
        check("GATEWAY_NATS" not in env, "default: standalone (no GATEWAY_NATS)")
        check(dep["spec"]["replicas"] == 1, "default: one replica")
        check(len(d.get("Secret", [])) == 1, "default: the chart creates the HS256 Secret")
        check(env["GATEWAY_JWT_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == d["Secret"][0]["metadata"]["name"],
              "default: GATEWAY_JWT_SECRET comes from that Secret")
        check("HorizontalPodAutoscaler" not in d and "ServiceMonitor" not in d, "default: no HPA, no ServiceMonitor")
        check("PrometheusRule" not in d, "default: no PrometheusRule, no dashboard ConfigMap")
        check("ConfigMap" not in d and "GATEWAY_CONFIG" not in env, "default: no config file")
    c = rendered.get("cluster", {})
    if c:
        dep = c["Deployment"][0]
        pod = dep["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        check(env.get("GATEWAY_NATS", {}).get("value") == CLUSTER["nats"]["url"], "cluster: GATEWAY_NATS is nats.url")
        check(env.get("GATEWAY_NATS_REPLICAS", {}).get("value") == "3", "cluster: GATEWAY_NATS_REPLICAS 3")
        check(pod["terminationGracePeriodSeconds"] == 10 + 40 + 5,
              f"cluster: grace period 55 s for drain 30 s + spread 10 s + preStop 10 s (got {pod['terminationGracePeriodSeconds']})")
        check("replicas" not in dep["spec"], "cluster: replicas left to the HPA")
        hpa = c.get("HorizontalPodAutoscaler", [])
        check(len(hpa) == 1 and hpa[0]["spec"]["maxReplicas"] == 12, "cluster: HPA rendered")
        hpa_metrics = hpa[0]["spec"]["metrics"] if hpa else []
        check([m["type"] for m in hpa_metrics] == ["Resource", "Pods"], f"cluster: HPA on CPU and a Pods metric ({hpa_metrics})")
        pods = hpa_metrics[1]["pods"] if len(hpa_metrics) == 2 else {}
        check(pods.get("metric") == {"name": "gateway_conns_active"}
              and pods.get("target") == {"type": "AverageValue", "averageValue": "15000"},
              f"cluster: HPA target 15000 connections per pod on gateway_conns_active ({pods})")
        files = os.path.join(os.path.abspath(CHART), "files")
        with open(os.path.join(files, "alerts.yaml")) as f:
            rules = yaml.safe_load(f)
        pr = c.get("PrometheusRule", [])
        check(len(pr) == 1 and pr[0]["spec"] == rules and pr[0]["metadata"]["labels"].get("release") == "prom",
              "cluster: PrometheusRule holds files/alerts.yaml exactly, with its labels")
        alerts = [r["alert"] for g in rules["groups"] for r in g["rules"]]
        check(len(alerts) == 6 and all(r.get("annotations", {}).get("description", "").count("docs/observability.md")
                                       for g in rules["groups"] for r in g["rules"]),
              f"alerts: six, each pointing at its runbook ({alerts})")
        with open(os.path.join(files, "dashboard.json")) as f:
            dashboard = json.load(f)
        dash_cm = [m for m in c.get("ConfigMap", []) if m["metadata"]["name"].endswith("-dashboard")]
        check(len(dash_cm) == 1 and json.loads(dash_cm[0]["data"]["gateway-dashboard.json"]) == dashboard
              and dash_cm[0]["metadata"]["labels"].get("grafana_dashboard") == "1",
              "cluster: dashboard ConfigMap holds files/dashboard.json, labelled for the Grafana sidecar")
        sm = c.get("ServiceMonitor", [])
        check(len(sm) == 1 and sm[0]["spec"]["endpoints"][0]["port"] == "metrics", "cluster: ServiceMonitor on the metrics port")
        check("Secret" not in c, "cluster: existingSecret, so no Secret created")
        ref = env["GATEWAY_JWT_SECRET"]["valueFrom"]["secretKeyRef"]
        check(ref == {"name": "chat-jwt", "key": "hs256"}, f"cluster: JWT secret from the existing Secret ({ref})")
        check(dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == "25%", "cluster: maxSurge from values")
        toml_text = next(m for m in c["ConfigMap"] if "gateway.toml" in m.get("data", {}))["data"]["gateway.toml"]
        try:
            cfg = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as e:
            cfg = {}
            print(toml_text)
            check(False, f"cluster: gateway.toml parses ({e})")
        check(cfg == CLUSTER["config"], f"cluster: gateway.toml holds config exactly, integers as integers ({cfg})")
        check(env.get("GATEWAY_CONFIG", {}).get("value") == "/etc/gateway/config/gateway.toml", "cluster: GATEWAY_CONFIG set")
    t = rendered.get("tls", {})
    if t:
        c0 = t["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c0)
        check(env.get("GATEWAY_TLS_CERT", {}).get("value") == "/etc/gateway/tls/tls.crt", "tls: GATEWAY_TLS_CERT")
        check(env.get("GATEWAY_TLS_KEY", {}).get("value") == "/etc/gateway/tls/tls.key", "tls: GATEWAY_TLS_KEY")
        check(all(c0[p]["httpGet"]["scheme"] == "HTTPS" for p in ("startupProbe", "readinessProbe", "livenessProbe")),
              "tls: probes use HTTPS")
        check("GATEWAY_JWT_SECRET" not in env and "Secret" not in t, "tls: hs256 off, no JWT secret")
        check(env.get("GATEWAY_JWT_PUBLIC_KEY", {}).get("value") == "/etc/gateway/jwt/a.pem,/etc/gateway/jwt/b.pem",
              "tls: GATEWAY_JWT_PUBLIC_KEY lists the mounted files")
        check(env.get("GATEWAY_ALLOWED_ORIGINS", {}).get("value") == "https://chat.example.com", "tls: allowed origins")
        sm = t.get("ServiceMonitor", [])
        check(len(sm) == 1 and sm[0]["spec"]["endpoints"][0]["scheme"] == "https", "tls: ServiceMonitor scrapes https on the ws port")

    # 5. Values that must not render.
    with helm.Chart.load(CHART) as chart:
        for label, (values, phrase) in MUST_FAIL.items():
            try:
                chart.render(values, name="chat", namespace="chat", is_install=True)
                check(False, f"{label}: rendering fails (it rendered)")
            except helm.HelmError as e:
                check(phrase in str(e), f"{label}: rendering fails with a clear message ({str(e).splitlines()[0][:160]})")

    print(f"{'FAILED' if failures else 'passed'}: {len(failures)} failed check(s), {time.monotonic() - started:.1f} s")
    for f in failures:
        print(f"  failed: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

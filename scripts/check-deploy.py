#!/usr/bin/env python3
"""Checks the shipping artifacts against each other and against the metrics sidecache exports.

Run by .ci/run (after the validators are installed); exits 1 listing every problem.

1. Metric names: every `sidecache_*` name used by config/grafana/sidecache.json and
   config/prometheus/alerts.yml is a family of SPEC §7 or a name defined in src/metrics.rs
   (histogram series `_bucket`/`_sum`/`_count` count as their family), and every label that a
   query matches on or groups by belongs to that family (or is a target label: job, instance…).
   The SPEC list below is checked against ../shared/design/SPEC.md (or $SIDECACHE_SPEC_MD) when
   that file is present.
   Names the SPEC promises but src/metrics.rs does not define yet are listed (fatal with
   --require-exported, for when every feature has landed).
2. PromQL syntax of every dashboard query (and template variable), by handing them to
   `promtool check rules` as recording rules with Grafana's variables substituted.
3. The PodMonitor against config/k8s/schemas/podmonitor-v1.json (kubernetes-validate has no
   schema for custom resources), and the manifests against each other and the Dockerfile:
   native sidecar, probe paths and port, admin port in the ConfigMap, annotations and PodMonitor,
   ConfigMap mounted as a directory where the entrypoint's --config points, password file under
   the Secret's mount, restricted security context.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import jsonschema
import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# SPEC §7: family -> labels. Histograms are marked.
SPEC_FAMILIES = {
    "sidecache_cache_hits_total": {"rule"},
    "sidecache_cache_misses_total": {"rule"},
    "sidecache_cache_evictions_total": {"rule", "reason"},
    "sidecache_cache_invalidations_total": {"source"},
    "sidecache_cache_entries": {"rule"},
    "sidecache_cache_bytes": {"rule"},
    "sidecache_cache_invalidation_lag_seconds": set(),
    "sidecache_cache_stale_detected_total": set(),
    "sidecache_coherence_up": set(),
    "sidecache_commands_total": {"family"},
    "sidecache_command_duration_seconds": {"family"},
    "sidecache_client_connections": set(),
    "sidecache_upstream_up": set(),
    "sidecache_ttl_applied_total": {"rule"},
    "sidecache_ttl_missing_total": {"db"},
    "sidecache_lock_acquire_total": {"outcome"},
    "sidecache_lock_wait_seconds": set(),
    "sidecache_serial_regressions_total": set(),
    "sidecache_protocol_errors_total": {"kind"},
}
HISTOGRAMS = {"sidecache_cache_invalidation_lag_seconds", "sidecache_command_duration_seconds", "sidecache_lock_wait_seconds"}
# Labels Prometheus attaches to every scraped series (target labels), usable anywhere.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}
PROMQL_WORDS_AFTER_NAME = re.compile(r"\{([^}]*)\}")

problems = []


def problem(msg):
    problems.append(msg)


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def exported_families():
    """Names and labels defined in src/metrics.rs: `pub const X: &str = "sidecache_…"` and
    `counter!(X, "label" => …)`-style registrations."""
    src = read("src/metrics.rs")
    consts = dict(re.findall(r'pub const ([A-Z0-9_]+): &str = "(sidecache_[a-z0-9_]+)"', src))
    families = {name: set() for name in consts.values()}
    for const, label in re.findall(r'(?:counter|gauge|histogram)!\(\s*([A-Z0-9_]+)\s*,\s*"([a-z_]+)"\s*=>', src):
        if const in consts:
            families[consts[const]].add(label)
    histograms = {consts[c] for c in re.findall(r"describe_histogram!\(\s*([A-Z0-9_]+)", src) if c in consts}
    return families, histograms


def check_spec_list():
    spec = os.environ.get("SIDECACHE_SPEC_MD", os.path.join(ROOT, "..", "shared", "design", "SPEC.md"))
    if not os.path.exists(spec):
        print("check-deploy: ../shared/design/SPEC.md not found; using the SPEC §7 list built into this script")
        return
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## 7. Admin HTTP", 1)[-1].split("\n## ", 1)[0]
    found = {}
    for name, labels in re.findall(r"`(sidecache_[a-z0-9_]+)(?:\{([a-z_,]+)\})?`", section):
        found[name] = set(labels.split(",")) if labels else set()
    if found != SPEC_FAMILIES:
        problem(f"the SPEC §7 list in this script differs from SPEC.md: script {sorted(SPEC_FAMILIES.items())} "
                f"vs SPEC {sorted(found.items())}")


def family_of(name, families, histograms):
    if name in families:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in histograms:
            return name[: -len(suffix)]
    return None


def check_queries(where, exprs, families, histograms, all_labels):
    """Names and labels in PromQL expressions."""
    used = set()
    for expr in exprs:
        for m in re.finditer(r"\b(sidecache_[a-z0-9_]+)\b(\s*\{([^}]*)\})?", expr):
            name, matchers = m.group(1), m.group(3)
            family = family_of(name, families, histograms)
            if family is None:
                problem(f"{where}: {name} is neither a SPEC §7 family nor defined in src/metrics.rs")
                continue
            used.add(family)
            allowed = families[family] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""):
                if label not in allowed:
                    problem(f"{where}: {name} has no label {label!r} (labels: {sorted(families[family])})")
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in clause.split(","))):
                if label not in all_labels | TARGET_LABELS | {"le"}:
                    problem(f"{where}: grouping by {label!r}, which no sidecache metric has")
    return used


def dashboard_exprs(dash):
    exprs = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                exprs.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    variables = []
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            variables.append((v["name"], q))
    return exprs, variables


def grafana_to_promql(expr):
    for var, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[a-zA-Z_]+\}?", ".*", expr)


def check_promql_syntax(exprs):
    promtool = shutil.which("promtool")
    if promtool is None:
        problem("promtool is missing: install it with `apt-get install -y prometheus` (.ci/run does)")
        return
    rules = [{"record": f"sidecache:dashboard_query:{i}", "expr": grafana_to_promql(e)} for i, (_, e) in enumerate(exprs)]
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        path = f.name
    try:
        out = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
        if out.returncode != 0:
            problem(f"dashboard queries do not parse as PromQL:\n{out.stdout}{out.stderr}")
    finally:
        os.unlink(path)


def load_manifests():
    docs = {}
    k8s = os.path.join(ROOT, "config", "k8s")
    for name in sorted(os.listdir(k8s)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(k8s, name), encoding="utf-8") as f:
                for doc in yaml.safe_load_all(f):
                    if doc:
                        docs[(doc["kind"], doc["metadata"]["name"])] = (name, doc)
    return docs


def by_kind(docs, kind):
    found = [doc for (k, _), (_, doc) in docs.items() if k == kind]
    if len(found) != 1:
        problem(f"config/k8s: expected exactly one {kind}, found {len(found)}")
        return {}
    return found[0]


def port_of(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


def check_manifests():
    docs = load_manifests()
    with open(os.path.join(ROOT, "config", "k8s", "schemas", "podmonitor-v1.json"), encoding="utf-8") as f:
        schema = json.load(f)
    monitor = by_kind(docs, "PodMonitor")
    for err in jsonschema.Draft202012Validator(schema).iter_errors(monitor):
        problem(f"podmonitor: {'.'.join(map(str, err.path))}: {err.message}")

    deploy = by_kind(docs, "Deployment")
    config_map = by_kind(docs, "ConfigMap")
    secret = by_kind(docs, "Secret")
    if not (deploy and config_map and secret and monitor):
        return
    namespaces = {d["metadata"].get("namespace") for _, (_, d) in docs.items() if d["kind"] != "Namespace"}
    if len(namespaces) != 1:
        problem(f"config/k8s: resources in several namespaces: {namespaces}")

    pod = deploy["spec"]["template"]
    spec = pod["spec"]
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "sidecache"]
    if not sidecars:
        problem("deployment: no init container named sidecache")
        return
    side = sidecars[0]
    if side.get("restartPolicy") != "Always":
        problem("deployment: the sidecache init container needs restartPolicy: Always (native sidecar)")
    if any(a == "--config" or a.startswith("--config=") for a in side.get("args", []) + side.get("command", [])):
        problem("deployment: --config is already in the image's ENTRYPOINT; passing it again is a CLI error")
    ports = {p["name"]: p["containerPort"] for p in side.get("ports", [])}
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        http = side.get(probe, {}).get("httpGet", {})
        if http.get("path") != path or http.get("port") not in ("admin", ports.get("admin")):
            problem(f"deployment: sidecache {probe} must GET {path} on the admin port, got {http}")

    toml_text = config_map["data"].get("sidecache.toml", "")
    config = tomllib.loads(toml_text)
    admin_host, admin_port = port_of(config.get("admin_listen", "127.0.0.1:9180"))
    listen_host, listen_port = port_of(config.get("listen", "127.0.0.1:6380"))
    if admin_host not in ("0.0.0.0", "[::]"):
        problem("configmap: admin_listen must listen on all interfaces so probes and Prometheus reach it")
    if listen_host != "127.0.0.1":
        problem("configmap: listen should stay on 127.0.0.1 (the app reaches the sidecar over localhost)")
    if ports.get("admin") != admin_port or ports.get("redis") != listen_port:
        problem(f"deployment: container ports {ports} do not match the ConfigMap's addresses")
    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != str(admin_port) or annotations.get("prometheus.io/path") != "/metrics":
        problem("deployment: prometheus.io/port and /path annotations must name the admin port and /metrics")

    endpoints = monitor["spec"]["podMetricsEndpoints"]
    if any(e.get("port") != "admin" or e.get("path", "/metrics") != "/metrics" for e in endpoints):
        problem("podmonitor: must scrape port admin, path /metrics")
    labels = pod["metadata"].get("labels", {})
    for k, v in monitor["spec"]["selector"].get("matchLabels", {}).items():
        if labels.get(k) != v:
            problem(f"podmonitor: selector {k}={v} does not match the Deployment's pod labels")

    # The image runs `--config /etc/sidecache/sidecache.toml`: the ConfigMap must be mounted as that
    # directory (no subPath, so edits propagate) and hold that key.
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", read("Dockerfile"), re.M)
    argv = json.loads(entry.group(1)) if entry else []
    config_path = argv[argv.index("--config") + 1] if "--config" in argv else None
    if config_path is None:
        problem("Dockerfile: ENTRYPOINT must pass --config")
        return
    config_dir, config_key = os.path.split(config_path)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in side.get("volumeMounts", [])}
    mount = mounts.get(config_dir)
    if not mount or volumes.get(mount["name"], {}).get("configMap", {}).get("name") != config_map["metadata"]["name"]:
        problem(f"deployment: the ConfigMap must be mounted at {config_dir}")
    elif "subPath" in mount:
        problem("deployment: the ConfigMap mount must not use subPath (updates would not propagate)")
    if config_key not in config_map["data"]:
        problem(f"configmap: no key {config_key}")
    password_file = config.get("upstream", {}).get("password_file")
    secret_mounts = [m for m in side.get("volumeMounts", [])
                     if volumes.get(m["name"], {}).get("secret", {}).get("secretName") == secret["metadata"]["name"]]
    if not password_file or not any(password_file == f"{m['mountPath']}/{k}" for m in secret_mounts
                                    for k in secret.get("stringData", secret.get("data", {}))):
        problem("configmap: upstream.password_file must name a key of the Secret under its mount")

    for container in spec.get("initContainers", []) + spec.get("containers", []):
        sc = container.get("securityContext", {})
        want = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
        for key, value in want.items():
            if sc.get(key) != value:
                problem(f"deployment: container {container['name']} needs securityContext.{key}: {value}")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problem(f"deployment: container {container['name']} must drop ALL capabilities")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault" and \
                spec.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problem(f"deployment: container {container['name']} needs seccompProfile RuntimeDefault")
        if "memory" not in container.get("resources", {}).get("limits", {}):
            problem(f"deployment: container {container['name']} needs a memory limit")


def main():
    require_exported = "--require-exported" in sys.argv[1:]
    check_spec_list()
    exported, exported_histograms = exported_families()
    families = {name: set(labels) for name, labels in SPEC_FAMILIES.items()}
    for name, labels in exported.items():
        families.setdefault(name, set()).update(labels)
    histograms = HISTOGRAMS | exported_histograms
    all_labels = set().union(*families.values())

    alerts = yaml.safe_load(read("config/prometheus/alerts.yml"))
    alert_exprs = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = check_queries("alerts.yml", alert_exprs, families, histograms, all_labels)
    for g in alerts["groups"]:
        for r in g["rules"]:
            text = " ".join(r.get("annotations", {}).values())
            for name in re.findall(r"\bsidecache_[a-z0-9_]+\b", text):
                if family_of(name, families, histograms) is None:
                    problem(f"alerts.yml: {r['alert']} mentions unknown metric {name}")

    dash = json.loads(read("config/grafana/sidecache.json"))
    panel_exprs, variables = dashboard_exprs(dash)
    used |= check_queries("sidecache.json", [e for _, e in panel_exprs] + [q for _, q in variables],
                          families, histograms, all_labels)
    check_promql_syntax(panel_exprs)

    check_manifests()

    not_exported = sorted(used - set(exported))
    if not_exported:
        msg = f"used by dashboard/alerts, in SPEC §7, not yet defined in src/metrics.rs: {', '.join(not_exported)}"
        if require_exported:
            problem(msg)
        else:
            print(f"check-deploy: note: {msg}")
    unused = sorted(set(SPEC_FAMILIES) - used)
    if unused:
        problem(f"SPEC §7 families shown by neither the dashboard nor the alerts: {', '.join(unused)}")

    if problems:
        for p in problems:
            print(f"check-deploy: {p}", file=sys.stderr)
        sys.exit(1)
    print(f"check-deploy: ok ({len(panel_exprs)} dashboard queries, {len(alert_exprs)} alert rules, "
          f"{len(used)} metric families, manifests consistent)")


if __name__ == "__main__":
    main()

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
4. The README's "Configuration reference" against the configuration code (no build needed):
   every key is read from the serde structs of src/config.rs and src/ttl.rs, starting at
   `Config`, with its default evaluated from their `Default` impls and constants. Every key must
   have a row (no more, no fewer) whose default, reload class (a key read by
   `Policy::from_config` in src/server.rs is reloaded, any other needs a restart), CLI flag
   (`Config::load`) and `SIDECACHE_*` variables (ENV_KEYS) are right; the environment table must
   be ENV_KEYS; the stated precedence must be the order in which `Config::load` merges. Also
   config/sidecache.toml must show every key, commented-out examples included, and nothing
   else, with the built-in default as the value of every line that is not commented out.
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


# 4. The README's configuration reference against the configuration code.

CONFIG_SOURCES = ("src/config.rs", "src/ttl.rs")
REFERENCE_HEADING = "## Configuration reference"
KEY_TABLE_HEADER = ["Key", "Type", "Default", "Reload", "CLI / environment", "Meaning"]
ENV_TABLE_HEADER = ["Variable", "Sets"]
PRECEDENCE = "command line > environment > file > built-in defaults"
RELOADED = {"live", "new clients"}
UNSET, REQUIRED = "unset", "required"
FILE_NAME = re.compile(r"\.(?:toml|rs|py|sh|ya?ml|md|json|dot|png)$")


class Unreadable(Exception):
    """A piece of the configuration code this check cannot interpret; the check must learn it."""


class Duration:
    """A `std::time::Duration` default, in nanoseconds."""

    def __init__(self, nanos):
        self.nanos = nanos

    def render(self):
        """As `crate::config::duration` writes it (humantime, spaces removed)."""
        secs, nanos = divmod(self.nanos, 10**9)
        if secs == 0 and nanos == 0:
            return "0s"
        years, rest = divmod(secs, 31_557_600)
        months, rest = divmod(rest, 2_630_016)
        days, rest = divmod(rest, 86_400)
        parts = [(years, "year", True), (months, "month", True), (days, "day", True),
                 (rest // 3600, "h", False), (rest % 3600 // 60, "m", False), (rest % 60, "s", False),
                 (nanos // 10**6, "ms", False), (nanos // 1000 % 1000, "us", False), (nanos % 1000, "ns", False)]
        return "".join(f"{n}{unit}{'s' if plural and n > 1 else ''}" for n, unit, plural in parts if n)


def render_size(n):
    """As `crate::config::size::render` writes it."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def toml_literal(value, kind=None):
    """The TOML literal of a value as the reference config and README write it."""
    if isinstance(value, Duration):
        return json.dumps(value.render())
    if kind == "size" and isinstance(value, int) and not isinstance(value, bool):
        return json.dumps(render_size(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise Unreadable(f"no TOML literal for {value!r}")


def canonical(literal):
    """A TOML literal (with an optional trailing comment) in the form toml_literal writes."""
    return toml_literal(tomllib.loads(f"v = {literal}")["v"])


def split_top(text, sep=","):
    """Splits at `sep` outside brackets, parentheses and strings."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"' and text[i - 1:i] != "\\":
            quoted = not quoted
        elif not quoted and ch in "([{":
            depth += 1
        elif not quoted and ch in ")]}":
            depth -= 1
        elif not quoted and depth == 0 and ch == sep:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def config_model():
    """The serde structs and enums of the configuration, its constants and `Default` impls."""
    text = "\n".join(read(p) for p in CONFIG_SOURCES)
    item = r"((?:[ \t]*(?:#\[[^\n]*\]|///[^\n]*)\n)*)pub {} (\w+) \{{\n(.*?)\n\}}"
    structs, enums = {}, {}
    for attrs, name, body in re.findall(item.format("struct"), text, re.S):
        if "Deserialize" not in attrs:
            continue
        fields, field_attrs = [], []
        for line in body.splitlines():
            s = line.strip()
            if not s or s.startswith("//"):
                continue
            if s.startswith("#["):
                field_attrs.append(s)
                continue
            m = re.fullmatch(r"pub (\w+): (.+),", s)
            if not m:
                raise Unreadable(f"struct {name}: cannot read the field line {s!r}")
            serde = " ".join(re.findall(r"#\[serde\((.*)\)\]", " ".join(field_attrs)))
            fields.append((m.group(1), re.sub(r"\b\w+::", "", m.group(2)), serde))
            field_attrs = []
        structs[name] = {"serde": " ".join(re.findall(r"#\[serde\((.*)\)\]", attrs)), "fields": fields,
                         "derives_default": bool(re.search(r"#\[derive\([^)]*\bDefault\b", attrs))}
    for attrs, name, body in re.findall(item.format("enum"), text, re.S):
        if "Deserialize" not in attrs:
            continue
        if 'rename_all = "lowercase"' not in attrs:
            raise Unreadable(f"enum {name}: only rename_all = \"lowercase\" enums are understood")
        variants, default, marked = [], None, False
        for line in body.splitlines():
            s = line.strip()
            if s == "#[default]":
                marked = True
            elif re.fullmatch(r"[A-Z]\w*,", s):
                variants.append(s[:-1].lower())
                default, marked = (variants[-1] if marked else default), False
        enums[name] = {"variants": variants, "default": default}
    consts = dict(re.findall(r"^(?:pub(?:\([^)]*\))? )?const (\w+): [^=\n]+ = (.+);$", text, re.M))
    impls = {}
    for name, built, body in re.findall(
            r"impl Default for (\w+) \{\s*fn default\(\) -> Self \{\s*(\w+) \{(.*?)\}\s*\}\s*\}", text, re.S):
        impls[name] = dict(tuple(x.strip() for x in f.split(":", 1)) for f in split_top(body))
    return {"structs": structs, "enums": enums, "consts": consts, "impls": impls, "text": text}


def eval_default(expr, model):
    """The value of a `Default` field expression (constants, durations, literals, enum variants)."""
    e = re.sub(r"\.(?:into|to_string|to_owned)\(\)$", "", expr.strip())
    e = re.sub(r"\.iter\(\)\.map\(.*\)\.collect\(\)$", "", e)
    if e in model["consts"]:
        return eval_default(model["consts"][e], model)
    m = re.fullmatch(r"Duration::from_(secs|millis)\((.+)\)", e)
    if m:
        return Duration(eval_default(m.group(2), model) * (10**9 if m.group(1) == "secs" else 10**6))
    if e == "Duration::ZERO":
        return Duration(0)
    if re.fullmatch(r'"[^"\\]*"', e):
        return e[1:-1]
    if re.fullmatch(r"[0-9_]+(?:\s*\*\s*[0-9_]+)*", e):
        product = 1
        for factor in e.split("*"):
            product *= int(factor.strip().replace("_", ""))
        return product
    if re.fullmatch(r"[0-9]+\.[0-9]+", e):
        return float(e)
    if e in ("true", "false"):
        return e == "true"
    if e == "Vec::new()":
        return []
    if e == "None":
        return UNSET
    if e.startswith("[") and e.endswith("]"):
        return [eval_default(x, model) for x in split_top(e[1:-1])]
    m = re.fullmatch(r"(\w+)::(\w+)", e)
    if m and m.group(1) in model["enums"] and m.group(2).lower() in model["enums"][m.group(1)]["variants"]:
        return m.group(2).lower()
    raise Unreadable(f"cannot evaluate the default {expr!r}")


def type_default(ty, model):
    """`Default::default()` of a field type."""
    if ty.startswith("Option<"):
        return UNSET
    if ty.startswith("Vec<"):
        return []
    if ty in model["enums"]:
        return model["enums"][ty]["default"]
    simple = {"bool": False, "String": "", "f64": 0.0, "f32": 0.0, "Duration": Duration(0)}
    if ty in simple:
        return simple[ty]
    if re.fullmatch(r"[ui](?:8|16|32|64|128|size)", ty):
        return 0
    raise Unreadable(f"no default known for the type {ty}")


def code_config_keys(model):
    """Every key the configuration code accepts: dotted name -> TOML literal of its default
    (`unset` for an optional value without one, `required` for a rule field without a default).
    Array-of-tables sections (`near_cache.rules`) are keys of their own, their fields `x.rules[].f`."""
    structs, keys = model["structs"], {}

    def walk(struct, prefix):
        st = structs[struct]
        if re.search(r"\b(?:rename_all|flatten|untagged)\b", st["serde"]):
            raise Unreadable(f"struct {struct}: serde attributes this check does not understand: {st['serde']}")
        section_default = re.search(r"\bdefault\b", st["serde"]) is not None
        impl = model["impls"].get(struct)
        if section_default and impl is None and not st["derives_default"]:
            raise Unreadable(f"struct {struct}: #[serde(default)] without a Default impl this check can read")
        for name, ty, serde in st["fields"]:
            if re.search(r"\b(?:flatten|rename|alias)\b|\bdefault\s*=", serde):
                raise Unreadable(f"{prefix}{name}: serde attributes this check does not understand: {serde}")
            if re.search(r"\bskip\b|\bskip_deserializing\b", serde):
                continue
            key = prefix + name
            inner = re.fullmatch(r"Vec<(\w+)>", ty)
            if ty in structs:
                walk(ty, key + ".")
                continue
            if section_default:
                value = eval_default(impl[name], model) if impl else type_default(ty, model)
            elif re.search(r"\bdefault\b", serde):
                value = type_default(ty, model)
            else:
                value = REQUIRED
            kind = "size" if re.search(r'with = "(?:[\w:]*::)?size"', serde) else None
            keys[key] = value if value in (UNSET, REQUIRED) else toml_literal(value, kind)
            if inner and inner.group(1) in structs:
                walk(inner.group(1), key + "[].")

    walk("Config", "")
    return keys


def env_keys(model):
    block = re.search(r"const ENV_KEYS: [^=]+= \[(.*?)\];", model["text"], re.S)
    if not block:
        raise Unreadable("src/config.rs: ENV_KEYS not found")
    return re.findall(r'\("([A-Z_]+)", "([a-z_.]*)"\)', block.group(1))


def env_key(name, table):
    """`SIDECACHE_FOO__BAR` -> `foo.bar`, as `env_key` in src/config.rs maps it."""
    if not name.startswith("SIDECACHE_"):
        return None
    rest = name[len("SIDECACHE_"):]
    for env, key in table:
        if env.endswith("__"):
            if rest.startswith(env):
                field = rest[len(env):]
                if field and "__" not in field:
                    return key + field.lower()
        elif rest == env:
            return key
    return None


def reference_config_keys():
    """Keys of config/sidecache.toml, commented-out examples included: key -> the canonical literal
    of its value, or None when the line is commented out."""
    keys, table = {}, ""
    for number, raw in enumerate(read("config/sidecache.toml").splitlines(), 1):
        line, commented = raw.strip(), False
        if line.startswith("#"):
            body = line.lstrip("#").strip()
            if not re.fullmatch(r"\[\[?[a-z_.]+\]\]?|[a-z_]+\s*=\s*\S.*", body):
                continue
            line, commented = body, True
        if not line:
            continue
        m = re.fullmatch(r"(\[\[?)([a-z_.]+)\]\]?\s*(?:#.*)?", line)
        if m:
            if m.group(1) == "[[":
                keys.setdefault(m.group(2), None)
                table = m.group(2) + "[]."
            else:
                table = m.group(2) + "."
            continue
        m = re.fullmatch(r"([a-z_]+)\s*=\s*(.+)", line)
        if not m:
            problem(f"config/sidecache.toml:{number}: cannot read {raw!r}")
            continue
        try:
            keys[table + m.group(1)] = None if commented else canonical(m.group(2))
        except tomllib.TOMLDecodeError as e:
            problem(f"config/sidecache.toml:{number}: {m.group(2)!r} is not a TOML value ({e})")
    return keys


def markdown_tables(text):
    tables, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if current is None:
            current = {"header": cells, "rows": []}
            tables.append(current)
        elif not re.fullmatch(r"[\s|:-]+", line):
            current["rows"].append(cells)
    return tables


def function_body(text, signature):
    start = text.find(signature)
    if start < 0:
        raise Unreadable(f"{signature!r} not found")
    return text[start:text.find("\n    }\n", start)]


def check_config_reference():
    """Every key the configuration code accepts is in the README's configuration reference with
    its real default, how a reload treats it and the CLI flag and environment variable that set
    it, and nothing else is; config/sidecache.toml shows every key with its default; the
    environment table is ENV_KEYS; the documented precedence is the order Config::load merges."""
    try:
        model = config_model()
        keys = code_config_keys(model)
        env_table = env_keys(model)
        load = function_body(model["text"], "pub fn load(")
        policy = function_body(read("src/server.rs"), "pub fn from_config(c: &Config)")
    except Unreadable as e:
        problem(f"configuration reference: {e} (src/config.rs changed shape; teach scripts/check-deploy.py)")
        return 0
    arrays = {k for k in keys if any(other.startswith(k + "[].") for other in keys)}

    # config/sidecache.toml, the fully commented reference configuration.
    shown = reference_config_keys()
    for key in sorted(set(keys) - set(shown)):
        problem(f"config/sidecache.toml does not show {key} (not even commented out)")
    for key in sorted(set(shown) - set(keys)):
        problem(f"config/sidecache.toml shows {key}, which the configuration code does not accept")
    for key, literal in sorted(shown.items()):
        if key not in keys:
            continue
        if literal is None and keys[key] not in (UNSET, REQUIRED) and key not in arrays:
            problem(f"config/sidecache.toml: {key} is commented out; show it with its default {keys[key]}")
        elif literal is not None and literal != keys[key]:
            problem(f"config/sidecache.toml: {key} = {literal}, but the built-in default is {keys[key]}")

    readme = read("README.md")
    if REFERENCE_HEADING not in readme:
        problem(f"README.md has no {REFERENCE_HEADING!r} section")
        return len(keys)
    section = readme.split(REFERENCE_HEADING, 1)[1].split("\n## ", 1)[0]
    where = "README configuration reference"
    if PRECEDENCE not in section:
        problem(f"{where}: does not state the precedence {PRECEDENCE!r}")
    order = [load.find(s) for s in ("Serialized::defaults(", "Toml::file_exact(", "env_key(", "cli.")]
    if -1 in order or order != sorted(order):
        problem(f"Config::load no longer merges defaults, file, environment, CLI in that order: "
                f"fix the precedence in the README and config/sidecache.toml, then this check")

    cli = {key: "--" + field.replace("_", "-")
           for key, field in re.findall(r'\("([a-z_.]+)", cli\.(\w+)', load)}
    reloaded = set(re.findall(r"\bc\.([a-z_]+(?:\.[a-z_]+)*)", policy))

    tables = markdown_tables(section)
    documented = {}
    for table in tables:
        if table["header"] != KEY_TABLE_HEADER:
            continue
        for cells in table["rows"]:
            m = re.fullmatch(r"`([a-z_.\[\]]+)`", cells[0]) if len(cells) == len(KEY_TABLE_HEADER) else None
            if not m:
                problem(f"{where}: cannot read the row {' | '.join(cells)!r}")
                continue
            if m.group(1) in documented:
                problem(f"{where}: {m.group(1)} is documented twice")
            documented[m.group(1)] = dict(zip(KEY_TABLE_HEADER, cells))
    for key in sorted(set(keys) - set(documented)):
        problem(f"{where}: {key} is missing")
    for key in sorted(set(documented) - set(keys)):
        problem(f"{where}: {key} is documented but the configuration code has no such key")

    for key, row in sorted(documented.items()):
        if key not in keys:
            continue
        want, cell = keys[key], row["Default"]
        if want in (UNSET, REQUIRED):
            if not re.match(rf"{want}\b", cell):
                problem(f"{where}: {key}: the default column must start with `{want}`, not {cell!r}")
        else:
            m = re.match(r"`([^`]+)`", cell)
            try:
                got = canonical(m.group(1)) if m else None
            except tomllib.TOMLDecodeError:
                got = None
            if got != want:
                problem(f"{where}: {key}: the default is {want} (written as `{want}`), not {cell!r}")
        is_reloaded = any(p == key or p.startswith(key + ".") or key.startswith(p + ".") for p in reloaded)
        if is_reloaded and row["Reload"] not in RELOADED:
            problem(f"{where}: {key}: a reload applies it (Policy::from_config in src/server.rs): "
                    f"say {' or '.join(sorted(RELOADED))}, not {row['Reload']!r}")
        if not is_reloaded and row["Reload"] != "restart":
            problem(f"{where}: {key}: a reload does not apply it (not in Policy::from_config): "
                    f"say restart, not {row['Reload']!r}")
        overrides = row["CLI / environment"]
        want_env = set()
        for env, target in env_table:
            name = "SIDECACHE_" + env + (key[len(target):].upper() if env.endswith("__") else "")
            if re.fullmatch(r"SIDECACHE_[A-Z0-9_]+", name) and env_key(name, env_table) == key:
                want_env.add(name)
        got_env = set(re.findall(r"\bSIDECACHE_[A-Z0-9_]+", overrides))
        if got_env != want_env:
            problem(f"{where}: {key}: the environment variables are {sorted(want_env) or 'none'}, "
                    f"not {sorted(got_env) or 'none'}")
        got_flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", overrides))
        want_flags = {cli[key]} if key in cli else set()
        if got_flags != want_flags:
            problem(f"{where}: {key}: the command-line flags are {sorted(want_flags) or 'none'}, "
                    f"not {sorted(got_flags) or 'none'}")

    env_rows = [t for t in tables if t["header"] == ENV_TABLE_HEADER]
    want_rows = {("SIDECACHE_" + env + ("<KEY>" if env.endswith("__") else ""),
                  target + ("<key>" if env.endswith("__") else "")) for env, target in env_table}
    got_rows = set()
    for table in env_rows:
        for cells in table["rows"]:
            spans = [re.match(r"`([^`]+)`", c) for c in cells[:2]]
            if len(cells) < 2 or not all(spans):
                problem(f"{where}: cannot read the environment row {' | '.join(cells)!r}")
                continue
            got_rows.add(tuple(s.group(1) for s in spans))
    if not env_rows:
        problem(f"{where}: no environment table (| {' | '.join(ENV_TABLE_HEADER)} |)")
    for var, target in sorted(want_rows - got_rows):
        problem(f"{where}: the environment table lacks `{var}` -> `{target}` (ENV_KEYS in src/config.rs)")
    for var, target in sorted(got_rows - want_rows):
        problem(f"{where}: the environment table lists `{var}` -> `{target}`, which ENV_KEYS does not map")

    # Names elsewhere in the section: keys, sections and variables that exist.
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k} | {k.split("[]")[0] for k in keys}
    for name in sorted(set(re.findall(r"`([a-z_]+(?:\.[a-z_]+|\[\])+(?:\.[a-z_]+)*)`", section))):
        if not FILE_NAME.search(name) and name not in keys and name not in sections:
            problem(f"{where}: mentions `{name}`, which is neither a key nor a section")
    for name in sorted(set(re.findall(r"\bSIDECACHE_[A-Z0-9_]*[A-Z0-9]\b", section))):
        target = env_key(name, env_table)
        if target is not None and target not in keys:
            problem(f"{where}: {name} would set {target}, which is not a key")
    return len(keys)


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
    config_keys = check_config_reference()

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
          f"{len(used)} metric families, manifests consistent, {config_keys} configuration keys documented)")


if __name__ == "__main__":
    main()

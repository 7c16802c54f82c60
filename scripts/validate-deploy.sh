#!/usr/bin/env bash
# Validates the shipping artifacts (issue 6): Dockerfile, Kubernetes manifests, Prometheus
# alerts and their unit tests, the Grafana dashboard's metrics and PromQL, and the README's
# configuration reference and config/sidecache.toml against the configuration code. Installs
# the validators first when they are missing (scripts/ensure-deploy-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deploy-tools.sh
echo "validate: hadolint Dockerfile"
hadolint --failure-threshold error Dockerfile
# podmonitor.yaml is a custom resource kubernetes-validate has no schema for (it would only
# warn); scripts/check-deploy.py validates it against config/k8s/schemas/podmonitor-v1.json.
manifests=()
for f in config/k8s/*.yaml; do
    [ "$f" = config/k8s/podmonitor.yaml ] || manifests+=("$f")
done
echo "validate: kubernetes-validate --strict (1.29, the first release with native sidecars on by default, and the latest)"
kubernetes-validate --strict --quiet -k 1.29.0 "${manifests[@]}"
kubernetes-validate --strict --quiet "${manifests[@]}"
echo "validate: promtool check rules / test rules"
promtool check rules config/prometheus/alerts.yml
promtool test rules config/prometheus/alerts_test.yml
echo "validate: scripts/check-deploy.py"
# Every metric family the dashboard and alerts use must be one sidecache exports.
# Every configuration key must be in the README's reference, with its real default.
python3 scripts/check-deploy.py --require-exported
echo "validate: deployment artifacts ok"

"""The Helm chart in helm/, rendered offline with helm-python-sdk (no helm CLI, no cluster).

Asserts what a production rollout of long-lived streams depends on: the restricted
security context, probes, the config checksum that rolls pods, a grace period longer
than preStop + drain, and that bad values (schema violations, several replicas on the
in-process broker) fail at install time with a message that says why. The alerts and the
Grafana dashboard may select only series, labels and label values the gateway emits (the
alerts' behaviour is tested by promtool: helm/tests/alerts_test.yaml).
"""

from __future__ import annotations

import ast
import base64
import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import helm_python as helm
except ImportError:  # the `requires` marker reports it: a skip locally, a failure in CI
    helm = None

pytestmark = pytest.mark.requires("helm-python-sdk")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "gw"

# A redis-broker setup that may run several replicas.
REDIS = {
    "config": {"broker": {"kind": "redis", "url": "${REDIS_URL}"}},
    "secret": {"redisUrl": "redis://redis:6379/0"},
}

# Labels Prometheus gives every scraped series (the ServiceMonitor's targets), not the gateway.
TARGET_LABELS = frozenset({"namespace", "job", "instance", "pod", "service", "container", "endpoint"})

# gateway_upstream_connects_total{reason}: "initial" is a first connect, every other reason a
# reconnect. The code has no catalogue of them: test_upstream_connect_reasons_match_the_code
# checks this list against gateway/upstream/sse_feed.py and gateway/upstream/job_mux.py.
UPSTREAM_CONNECT_REASONS = frozenset({
    "initial", "eof", "error", "timeout", "closed", "http_5xx", "http_408", "http_409", "http_425", "http_429",
})


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object (NOTES.txt left out)."""
    manifests = chart.render(values, name=RELEASE, namespace="streaming")
    docs = []
    for source, text in manifests.items():
        if not source.endswith(".yaml"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def deployment(chart: Any, values: dict[str, Any] | None = None) -> dict[str, Any]:
    (dep,) = find(render(chart, values), "Deployment")
    return dep


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (gateway,) = dep["spec"]["template"]["spec"]["containers"]
    return gateway


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge values layers, later ones winning (as helm -f a -f b does)."""
    result: dict[str, Any] = {}
    for layer in layers:
        stack = [(result, layer)]
        while stack:
            into, source = stack.pop()
            for key, value in source.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict):
                    stack.append((into[key], value))
                else:
                    into[key] = copy.deepcopy(value)
    return result


def test_chart_metadata(chart: Any) -> None:
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.name == "stratix-gateway"
    assert chart.schema is not None


def test_pod_runs_restricted(chart: Any) -> None:
    dep = deployment(chart)
    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container(dep)["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    # the only writable path is an emptyDir at /tmp
    mounts = {m["mountPath"]: m for m in container(dep)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/gateway"]["readOnly"] is True
    (account,) = find(render(chart), "ServiceAccount")
    assert account["automountServiceAccountToken"] is False


def test_probes_hit_health_endpoints(chart: Any) -> None:
    gateway = container(deployment(chart))
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["ports"][0] == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    assert gateway["args"] == ["serve", "--config", "/etc/gateway/gateway.yaml"]


def test_container_port_follows_config(chart: Any) -> None:
    gateway = container(deployment(chart, {"config": {"server": {"port": 9000}}}))
    assert gateway["ports"][0]["containerPort"] == 9000


def test_grace_period_exceeds_prestop_plus_drain(chart: Any) -> None:
    for drain, pre_stop in [(10, 10), (45, 5), (2.5, 0)]:
        dep = deployment(
            chart, {"config": {"server": {"drain_timeout": drain}}, "rollout": {"preStopSeconds": pre_stop}}
        )
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > pre_stop + drain
        lifecycle = container(dep).get("lifecycle")
        if pre_stop:
            command = lifecycle["preStop"]["exec"]["command"]
            assert command == ["python", "-c", f"import time; time.sleep({pre_stop})"]
        else:
            assert lifecycle is None


def test_prestop_sleep_action(chart: Any) -> None:
    dep = deployment(chart, {"rollout": {"preStopMode": "sleep", "preStopSeconds": 7}})
    assert container(dep)["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}


def test_too_short_grace_period_is_refused(chart: Any) -> None:
    values = {"rollout": {"terminationGracePeriodSeconds": 20, "preStopSeconds": 10}}
    with pytest.raises(helm.HelmRenderError, match=r"must exceed rollout\.preStopSeconds"):
        render(chart, values)
    ok = deployment(chart, {"rollout": {"terminationGracePeriodSeconds": 21, "preStopSeconds": 10}})
    assert ok["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 21


def test_rollout_never_drops_below_desired(chart: Any) -> None:
    spec = deployment(chart)["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["minReadySeconds"] > 0


def test_checksum_annotation_rolls_pods_on_config_change(chart: Any) -> None:
    def checksums(values: dict[str, Any] | None) -> dict[str, str]:
        annotations = deployment(chart, values)["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    base = checksums(None)
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/config"])
    assert checksums(None) == base
    changed = checksums({"config": {"logging": {"level": "debug"}}})
    assert changed["checksum/config"] != base["checksum/config"]
    assert changed["checksum/secret"] == base["checksum/secret"]
    rotated = checksums({"secret": {"stratixApiKey": "new-key"}})
    assert rotated["checksum/secret"] != base["checksum/secret"]
    assert "checksum/secret" not in checksums({"secret": {"existingSecret": "mine"}})


def test_configmap_holds_the_gateway_config(chart: Any) -> None:
    (configmap,) = find(render(chart), "ConfigMap")
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert config["server"]["host"] == "0.0.0.0"
    assert config["upstream"]["api_key"] == "${STRATIX_API_KEY}"
    assert config["auth"]["jwt"]["secret"] == "${GATEWAY_JWT_SECRET}"
    # every key of the example config/gateway.yaml is in the chart's config
    example = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())
    chart_config = chart.values["config"]

    def paths(node: Any, prefix: str = "") -> set[str]:
        if not isinstance(node, dict):
            return {prefix} if node is not None else set()
        return {p for k, v in node.items() for p in paths(v, f"{prefix}.{k}" if prefix else k)}

    assert paths(example) - paths(chart_config) == set()


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.stem if p else "default")
def test_rendered_config_is_accepted_by_the_gateway(chart: Any, values_file: Path | None) -> None:
    from gateway import config as gateway_config
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    (configmap,) = [d for d in find(render(chart, values), "ConfigMap") if "gateway.yaml" in d["data"]]
    env = {
        "STRATIX_API_KEY": "test-key",
        "GATEWAY_JWT_SECRET": "x" * 32,
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "REDIS_PASSWORD": "p" * 16,
        "GATEWAY_ADMIN_API_KEY": "a" * 32,
    }
    config = gateway_config.parse_config(yaml.safe_load(configmap["data"]["gateway.yaml"]), env)
    assert config.server.host == "0.0.0.0"


def test_secrets_reach_the_pod_as_env(chart: Any) -> None:
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(deployment(chart))["env"]}
    assert env == {
        "STRATIX_API_KEY": {"name": f"{RELEASE}-stratix-gateway", "key": "stratix-api-key"},
        "GATEWAY_JWT_SECRET": {"name": f"{RELEASE}-stratix-gateway", "key": "gateway-jwt-secret"},
    }
    docs = render(chart, merge(REDIS, {"replicaCount": 3}))
    (dep,) = find(docs, "Deployment")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(dep)["env"]}
    assert env["REDIS_URL"] == {"name": f"{RELEASE}-stratix-gateway", "key": "redis-url"}
    (secret,) = find(docs, "Secret")
    assert set(secret["data"]) == {"stratix-api-key", "gateway-jwt-secret", "redis-url"}


def test_existing_secret_replaces_the_chart_secret(chart: Any) -> None:
    values = {"secret": {"existingSecret": "vault-synced", "keys": {"stratixApiKey": "api", "jwtSecret": ""}}}
    docs = render(chart, values)
    assert find(docs, "Secret") == []
    (dep,) = find(docs, "Deployment")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(dep)["env"]}
    assert env == {"STRATIX_API_KEY": {"name": "vault-synced", "key": "api"}}


def test_the_admin_key_reaches_the_pod_only_with_the_admin_api_on(chart: Any) -> None:
    admin_on = {"config": {"admin": {"api_key": "${GATEWAY_ADMIN_API_KEY}"}}}

    def admin_env(docs: list[dict[str, Any]]) -> Any:
        (dep,) = find(docs, "Deployment")
        return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(dep)["env"]}.get("GATEWAY_ADMIN_API_KEY")

    docs = render(chart)
    assert admin_env(docs) is None and "gateway-admin-api-key" not in find(docs, "Secret")[0]["data"]
    docs = render(chart, merge(admin_on, {"secret": {"adminApiKey": "k" * 32}}))
    assert admin_env(docs) == {"name": f"{RELEASE}-stratix-gateway", "key": "gateway-admin-api-key"}
    (secret,) = find(docs, "Secret")
    assert base64.b64decode(secret["data"]["gateway-admin-api-key"]).decode() == "k" * 32
    existing = merge(admin_on, {"secret": {"existingSecret": "ops", "keys": {"adminApiKey": "admin"}}})
    assert admin_env(render(chart, existing)) == {"name": "ops", "key": "admin"}
    with pytest.raises(helm.HelmRenderError, match=r"secret\.adminApiKey is empty"):
        render(chart, admin_on)
    with pytest.raises(helm.HelmValuesError, match=re.escape("/config/admin/api_key")):
        render(chart, {"config": {"admin": {"api_key": "a-literal-key-in-the-values-" + "x" * 10}}})
    with pytest.raises(helm.HelmValuesError, match=re.escape("/secret/adminApiKey")):
        render(chart, merge(admin_on, {"secret": {"adminApiKey": "too-short"}}))


@pytest.mark.parametrize(
    "values",
    [{"replicaCount": 2}, {"autoscaling": {"enabled": True}}],
    ids=["replicaCount-2", "hpa"],
)
def test_several_replicas_need_the_redis_broker(chart: Any, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, values)
    message = str(failure.value)
    assert "config.broker.kind: redis" in message
    assert "own upstream stream" in message
    assert "one-stream-per-consumer limit" in message
    docs = render(chart, merge(REDIS, values))
    assert len(find(docs, "PodDisruptionBudget")) == 1


def test_redis_broker_needs_its_url(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"config\.broker\.url is empty"):
        render(chart, {"replicaCount": 2, "config": {"broker": {"kind": "redis"}}})


def test_sentinel_takes_its_password_from_the_secret_and_needs_a_master_name(chart: Any) -> None:
    values = yaml.safe_load((CHART / "ci" / "sentinel.yaml").read_text())
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container(deployment(chart, values))["env"]}
    assert env["REDIS_PASSWORD"] == "redis-password" and "REDIS_URL" not in env
    (secret,) = find(render(chart, values), "Secret")
    assert set(secret["data"]) == {"stratix-api-key", "gateway-jwt-secret", "redis-password"}
    values["config"]["broker"]["sentinel_master"] = None
    with pytest.raises(helm.HelmRenderError, match="sentinel_master is empty"):
        render(chart, values)


def test_cluster_uses_the_url_from_the_secret(chart: Any) -> None:
    values = yaml.safe_load((CHART / "ci" / "cluster.yaml").read_text())
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container(deployment(chart, values))["env"]}
    assert env["REDIS_URL"] == "redis-url" and "REDIS_PASSWORD" not in env


def test_no_disruption_budget_for_a_single_replica(chart: Any) -> None:
    assert find(render(chart), "PodDisruptionBudget") == []
    assert find(render(chart, merge(REDIS, {"replicaCount": 1})), "PodDisruptionBudget") == []


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": 0}, "/replicaCount"),
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"replicas": 2}, "replicas"),
        ({"image": {"repository": ""}}, "/image/repository"),
        ({"config": {"server": {"host": "127.0.0.1"}}}, "/config/server/host"),
        ({"config": {"server": {"drain_timeout": 0}}}, "/config/server/drain_timeout"),
        ({"config": {"broker": {"kind": "kafka"}}}, "/config/broker/kind"),
        ({"secret": {"jwtSecret": "too-short"}}, "/secret/jwtSecret"),
        ({"secret": {"redisUrl": "http://redis"}}, "/secret/redisUrl"),
        ({"rollout": {"preStopMode": "shell"}}, "/rollout/preStopMode"),
        ({"ingress": {"hosts": [{"host": "a.example", "paths": [{"path": "no-slash"}]}]}}, "path"),
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(chart, values)


def test_separate_metrics_port_must_listen_publicly(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"config\.metrics\.host"):
        render(chart, {"config": {"metrics": {"port": 9090}}})
    values = {"config": {"metrics": {"port": 9090, "host": "0.0.0.0"}}, "serviceMonitor": {"enabled": True}}
    docs = render(chart, values)
    (service,) = find(docs, "Service")
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "metrics"}
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_ingress_is_stream_friendly_on_nginx(chart: Any) -> None:
    override = {"nginx.ingress.kubernetes.io/proxy-send-timeout": "90"}
    values = {"ingress": {"enabled": True, "annotations": override}}
    (ingress,) = find(render(chart, values), "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "90"  # user wins
    assert ingress["spec"]["ingressClassName"] == "nginx"


def test_helm_test_pod_checks_readyz(chart: Any) -> None:
    (pod,) = find(render(chart), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert f"http://{RELEASE}-stratix-gateway:80/readyz" in script
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


# -- alerts and dashboard against what the gateway exports ---------------------------------------


def monitoring(chart: Any) -> tuple[dict[str, str], list[str]]:
    """The alerts (name -> expr) and every PromQL query of the Grafana dashboard (panels and variables)."""
    docs = render(chart, {"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}})
    (rule,) = find(docs, "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    (dashboard_map,) = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    dashboard = json.loads(dashboard_map["data"]["stratix-gateway.json"])
    variables = [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    queries = [
        *(t["expr"] for p in dashboard["panels"] for t in p["targets"]),
        *(q["query"] if isinstance(q, dict) else q for q in variables),
    ]
    return alerts, queries


@pytest.fixture(scope="module")
def series() -> dict[str, set[str]]:
    """Every series the gateway's registry exports (name -> label names), and `up` for the scrape itself."""
    from gateway import metrics as gateway_metrics
    metrics = gateway_metrics.Metrics()
    metrics.watch_streams(lambda: [("evaluations", 0.0)], clock=lambda: 1.0)
    metrics.watch_broker(lambda: (True, 0.0))  # shared mode's broker gauges
    for metric in vars(metrics).values():
        # prometheus_client keeps a metric's label names in _labelnames; one child each makes
        # collect() list the labelled series with their labels
        if names := getattr(metric, "_labelnames", ()):
            metric.labels(*names)
    exported = {s.name: set(s.labels) for family in metrics.registry.collect() for s in family.samples}
    return {**exported, "up": set()}


@functools.cache
def calls_in(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]


def gateway_calls(name: str, *paths: Path) -> list[ast.Call]:
    """Calls of a function or method called `name` in gateway/*.py (or in `paths`)."""
    found = []
    for path in paths or sorted(p for p in (ROOT / "gateway").rglob("*.py") if "sim" not in p.parts):
        for call in calls_in(path):
            func = call.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == name:
                found.append(call)
    return found


def strings(node: ast.AST | None) -> set[str]:
    """The string literals in `node` (both branches of `a if c else b`)."""
    if node is None:
        return set()
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def label_literals(*metric_attrs: str) -> set[str]:
    """Literal first labels of `<...>.<metric_attr>.labels("...")` calls in gateway/*.py."""
    found: set[str] = set()
    for call in gateway_calls("labels"):
        receiver = call.func.value
        name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", None)
        if name in metric_attrs and call.args and isinstance(call.args[0], ast.Constant):
            found.add(call.args[0].value)
    return found


def error_labels(error: str, default_code: str) -> set[str]:
    """The metric label of every `error(...)` raised in gateway/*.py: its `reason`, else its code."""
    found: set[str] = set()
    for call in gateway_calls(error):
        keywords = {k.arg: k.value for k in call.keywords}
        label = keywords.get("reason") or keywords.get("code")
        found |= strings(label) if label is not None else {default_code}
    return found


@pytest.fixture(scope="module")
def emitted() -> dict[tuple[str, str], set[str]]:
    """(series, label) -> every value the gateway gives that label: from its catalogues, else its source."""
    from gateway import errors
    from gateway.auth import tokens as auth
    from gateway.codec import closes, streams

    kinds = set(streams.KINDS)
    transports = label_literals("subscribers", "frames_sent")
    replay_outcomes = {v for node in ast.walk(ast.parse((ROOT / "gateway" / "hub" / "registry.py").read_text()))
                       if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "outcome"
                       for v in strings(node.value)}
    auth_reasons = (error_labels("AuthError", errors.AuthError.code)
                    | {r for call in gateway_calls("_invalid", ROOT / "gateway" / "auth" / "tokens.py")
                       for r in strings(call.args[0])}
                    | {reason for _, reason, _ in auth._JWT_ERRORS})
    limits = error_labels("LimitError", errors.LimitError.code) | label_literals("limit_rejections")
    return {
        ("gateway_subscribers", "transport"): transports,
        ("gateway_subscribers", "kind"): kinds,
        ("gateway_upstream_streams", "kind"): kinds,
        ("gateway_upstream_connects_total", "kind"): kinds,
        ("gateway_upstream_connects_total", "reason"): set(UPSTREAM_CONNECT_REASONS),
        ("gateway_upstream_events_total", "kind"): kinds,
        ("gateway_upstream_last_event_age_seconds", "kind"): kinds,
        ("gateway_frames_sent_total", "transport"): transports,
        ("gateway_closes_total", "code"): {reason.code for reason in closes.CATALOGUE},
        ("gateway_replay_requests_total", "outcome"): replay_outcomes,
        ("gateway_poll_requests_total", "outcome"): label_literals("polls"),
        # ws_stream.py holds the ws_messages counter as `outcomes`
        ("gateway_ws_client_messages_total", "outcome"): label_literals("ws_messages", "outcomes"),
        ("gateway_auth_failures_total", "reason"): auth_reasons,
        ("gateway_limit_rejections_total", "limit"): limits,
    }


# Labels whose values are free (bucket bounds, the version) or set by Prometheus.
FREE_LABELS = TARGET_LABELS | {"le", "version"}
SELECTOR = re.compile(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)|\blabel_values\([^,]*,\s*(\w+)\s*\)")


def selection_problems(expr: str, series: dict[str, set[str]], emitted: dict[tuple[str, str], set[str]]) -> list[str]:
    """What `expr` selects or groups by that the gateway never emits."""
    problems = []
    for metric, matchers in SELECTOR.findall(expr):
        for label, op, value in MATCHER.findall(matchers):
            if label in FREE_LABELS:
                continue
            if label not in series.get(metric, set()):
                problems.append(f"{metric} has no label {label!r}")
            elif (metric, label) not in emitted:
                problems.append(f"no known values of {metric}{{{label}}}: add them to emitted()")
            elif op in ("=", "!=") and value not in emitted[metric, label]:
                problems.append(f'{metric}{{{label}{op}"{value}"}}: the gateway never emits {value!r}')
            elif op in ("=~", "!~") and not any(re.fullmatch(value, v) for v in emitted[metric, label]):
                problems.append(f'{metric}{{{label}{op}"{value}"}}: matches no value the gateway emits')
    used = sorted({word for word in re.findall(r"\b[a-zA-Z_:][\w:]*\b", expr) if word in series})
    available = FREE_LABELS.union(*(series[metric] for metric in used))
    for group in GROUPING.findall(expr):
        for label in re.findall(r"\w+", " ".join(group)):
            if label not in available:
                problems.append(f"groups by {label!r}, which none of {used} has")
    return problems


def test_alerts_and_dashboard_use_exported_metrics(chart: Any, series: dict[str, set[str]]) -> None:
    alerts, queries = monitoring(chart)
    assert set(alerts) == {
        "StratixGatewayDown",
        "StratixGatewayBrokerUnavailable",
        "StratixGatewayUpstreamReconnectStorm",
        "StratixGatewayUpstreamSilent",
        "StratixGatewaySlowConsumerDisconnects",
        "StratixGatewayAuthFailureSpike",
        "StratixGatewayFanoutSlow",
    }  # each has cases in helm/tests/alerts_test.yaml (promtool, in .ci/deploy-checks)
    used = {m for expr in [*alerts.values(), *queries] for m in re.findall(r"\bgateway_\w+", expr)}
    assert {"gateway_upstream_connects_total", "gateway_fanout_delay_seconds_bucket", "gateway_build_info"} <= used
    assert used - set(series) == set()


def test_alerts_and_dashboard_select_label_values_the_gateway_emits(
    chart: Any, series: dict[str, set[str]], emitted: dict[tuple[str, str], set[str]]
) -> None:
    alerts, queries = monitoring(chart)
    assert all(emitted.values()), emitted
    assert [(expr, p) for expr in [*alerts.values(), *queries] for p in selection_problems(expr, series, emitted)] == []


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('sum(rate(gateway_upstream_connects_total{job="gw", reason="reconnect"}[5m]))', "never emits 'reconnect'"),
        ('gateway_upstream_connects_total{reason!="reconnect"}', "never emits 'reconnect'"),
        ('gateway_closes_total{code="gone"}', "never emits 'gone'"),
        ('gateway_subscribers{transport="sse", kind="evals"}', "never emits 'evals'"),
        ('gateway_limit_rejections_total{limit=~"max_conn"}', "matches no value"),
        ('gateway_frames_sent_total{kind="evaluations"}', "has no label 'kind'"),
        ('gateway_build_info{version="1", kind="evaluations"}', "has no label 'kind'"),
        ("sum by (reason) (rate(gateway_closes_total[5m]))", "groups by 'reason'"),
        ("label_values(gateway_build_info, kind)", "groups by 'kind'"),
    ],
)
def test_selection_check_catches(
    expr: str, problem: str, series: dict[str, set[str]], emitted: dict[tuple[str, str], set[str]]
) -> None:
    (found,) = selection_problems(expr, series, emitted)
    assert problem in found


def test_selection_check_passes_what_the_gateway_emits(
    series: dict[str, set[str]], emitted: dict[tuple[str, str], set[str]]
) -> None:
    exprs = [
        'sum by (kind) (rate(gateway_upstream_connects_total{job="$job", reason=~"http_.*|eof"}[5m]))',
        'sum by (code) (gateway_closes_total{code="slow_consumer"}) and on (namespace) up{namespace="x"}',
        'gateway_limit_rejections_total{limit="draining"} + ignoring (limit) gateway_auth_failures_total',
    ]
    assert [selection_problems(e, series, emitted) for e in exprs] == [[], [], []]


def test_upstream_connect_reasons_match_the_code() -> None:
    """UPSTREAM_CONNECT_REASONS is every reason gateway/upstream*.py counts a connect with."""
    found: set[str] = set()
    for path in (ROOT / "gateway" / "upstream" / "sse_feed.py", ROOT / "gateway" / "upstream" / "job_mux.py"):
        tree = ast.parse(path.read_text())
        # The label is always the variable `reason` ...
        connects = [c for c in gateway_calls("labels", path) if "upstream_connects" in ast.unparse(c.func)]
        assert connects and {ast.unparse(c.args[1]) for c in connects} == {"reason"}
        # ... set to a literal or to a _Retry's reason: a literal or f"http_{status if status < 500 else '5xx'}".
        for node in ast.walk(tree):
            if not isinstance(node, ast.Assign):
                continue
            target, value = node.targets[0], node.value
            both = isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
            for name, assigned in zip(target.elts, value.elts, strict=True) if both else [(target, value)]:
                if ast.unparse(name) == "reason":
                    assert isinstance(assigned, ast.Constant) or ast.unparse(assigned) == "exc.reason", (
                        f"{path.name}:{node.lineno}: reason = {ast.unparse(assigned)}")
                    found |= strings(assigned)
        from gateway.upstream.answers import RETRYABLE_STATUS

        retryable = set(RETRYABLE_STATUS)
        for call in gateway_calls("_Retry", path):
            (reason, *_) = call.args
            if isinstance(reason, ast.JoinedStr):
                prefix, status = reason.values
                assert isinstance(status, ast.FormattedValue), ast.unparse(reason)
                assert ast.unparse(status.value) == "status if status < 500 else '5xx'", ast.unparse(reason)
                (text,) = strings(prefix)
                found |= {f"{text}{code}" for code in [*retryable, *strings(status)]}
            else:
                found |= strings(reason)
    assert found == UPSTREAM_CONNECT_REASONS


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_ci_values_lint_and_render(chart: Any, values_file: Path) -> None:
    values = yaml.safe_load(values_file.read_text())
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert find(render(chart, values), "Deployment")

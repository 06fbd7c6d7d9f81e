"""Config validation: every problem reported together, each naming its dotted key."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, GatewayConfig, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"
API_KEY = "ll_test_" + "k" * 24
SECRET = "s" * 32


def minimal(**sections: dict[str, Any]) -> dict[str, Any]:
    """A valid document; `sections` are merged into it per section."""
    data: dict[str, Any] = {"upstream": {"api_key": API_KEY}, "auth": {"jwt": {"secret": SECRET}}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def problems(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env or {})
    assert info.value.problems, "a ConfigError must list its problems"
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


def only(data: Any, env: dict[str, str] | None = None) -> str:
    found = problems(data, env)
    assert len(found) == 1, found
    return found[0]


class TestValid:
    def test_minimal_document_and_defaults(self) -> None:
        config = parse_config(minimal(), {})
        assert isinstance(config, GatewayConfig)
        assert config.upstream.api_key == API_KEY
        assert config.auth.jwt.secret == SECRET
        assert config.auth.jwt.algorithms == ("HS256",)
        assert config.limits.one_stream_per_consumer == "replace"
        assert config.broker.kind == "memory"
        assert config.secrets() == (API_KEY, SECRET)

    def test_config_is_frozen(self) -> None:
        config = parse_config(minimal(), {})
        with pytest.raises(ValueError, match="frozen"):
            config.limits.linger = 1.0  # type: ignore[misc]

    def test_env_expansion(self) -> None:
        data = minimal(upstream={"api_key": "${KEY}", "base_url": "https://${HOST}"})
        config = parse_config(data, {"KEY": "from-env", "HOST": "api.example.com"})
        assert config.upstream.api_key == "from-env"
        assert config.upstream.base_url == "https://api.example.com"

    def test_base_url_trailing_slash_is_dropped(self) -> None:
        config = parse_config(minimal(upstream={"base_url": "http://localhost:9000/"}), {})
        assert config.upstream.base_url == "http://localhost:9000"
        assert config.upstream.ws_url == "ws://localhost:9000/ws/optimization"

    def test_public_key_algorithm_without_secret(self) -> None:
        data = minimal()
        data["auth"]["jwt"] = {"algorithms": ["RS256"], "jwks_url": "https://idp.example.com/jwks",
                               "audience": "stratix-gateway"}
        assert parse_config(data, {}).auth.jwt.secret is None

    def test_redis_broker_with_url(self) -> None:
        config = parse_config(minimal(broker={"kind": "redis", "url": "redis://localhost:6379/0"}), {})
        assert config.broker.url == "redis://localhost:6379/0"

    @pytest.mark.parametrize("policy", ["replace", "reject"])
    def test_stream_policies(self, policy: str) -> None:
        config = parse_config(minimal(limits={"one_stream_per_consumer": policy}), {})
        assert config.limits.one_stream_per_consumer == policy


class TestProblems:
    def test_unknown_keys_at_every_level(self) -> None:
        data = minimal(upstream={"bogus": 1}, limits={"linger_seconds": 3})
        data["auth"]["jwt"]["alg"] = "HS256"
        data["nope"] = {}
        assert sorted(problems(data)) == sorted([
            "upstream.bogus: unknown key",
            "limits.linger_seconds: unknown key",
            "auth.jwt.alg: unknown key",
            "nope: unknown key",
        ])

    def test_wrong_types_name_their_keys(self) -> None:
        found = problems(minimal(server={"port": "eighty"}, upstream={"connect_timeout": "soon"},
                                 websocket={"max_subscriptions": [1]}))
        assert sorted(p.split(":")[0] for p in found) == [
            "server.port", "upstream.connect_timeout", "websocket.max_subscriptions"]

    def test_out_of_range_values(self) -> None:
        found = problems(minimal(server={"port": 70000}, limits={"replay_buffer": 0, "heartbeat": 0}))
        assert sorted(p.split(":")[0] for p in found) == ["limits.heartbeat", "limits.replay_buffer", "server.port"]

    def test_missing_api_key(self) -> None:
        data = minimal()
        del data["upstream"]["api_key"]
        assert "upstream.api_key" in only(data)

    def test_missing_upstream_section(self) -> None:
        data = minimal()
        del data["upstream"]
        assert only(data) == "upstream: required key is missing"

    def test_unset_variable(self) -> None:
        found = problems(minimal(upstream={"api_key": "${STRATIX_API_KEY}"}), {"OTHER": "x"})
        assert "upstream.api_key: environment variable STRATIX_API_KEY is not set" in found

    def test_empty_variable_counts_as_unset(self) -> None:
        found = problems(minimal(upstream={"api_key": "${STRATIX_API_KEY}"}), {"STRATIX_API_KEY": ""})
        assert "upstream.api_key: environment variable STRATIX_API_KEY is not set" in found

    def test_unset_variable_in_a_list_names_the_index(self) -> None:
        found = problems(minimal(server={"allowed_origins": ["https://a.example", "${ORIGIN}"]}))
        assert any(p.startswith("server.allowed_origins[1]: environment variable ORIGIN") for p in found)

    def test_none_algorithm_refused(self) -> None:
        data = minimal()
        data["auth"]["jwt"]["algorithms"] = ["none"]
        problem = only(data)
        assert problem.startswith("auth.jwt.algorithms:") and "none" in problem

    @pytest.mark.parametrize("alg", ["None", "NONE"])
    def test_none_algorithm_refused_in_any_case(self, alg: str) -> None:
        data = minimal()
        data["auth"]["jwt"]["algorithms"] = ["HS256", alg]
        assert only(data).startswith("auth.jwt.algorithms:")

    def test_unsupported_algorithm(self) -> None:
        data = minimal()
        data["auth"]["jwt"]["algorithms"] = ["HS1"]
        assert only(data).startswith("auth.jwt.algorithms:")

    def test_hmac_and_public_key_mix_refused(self) -> None:
        data = minimal()
        data["auth"]["jwt"].update(algorithms=["HS256", "RS256"], public_key="-----BEGIN PUBLIC KEY-----")
        problem = only(data)
        assert problem.startswith("auth.jwt:") and "mixing" in problem

    def test_short_hmac_secret_refused(self) -> None:
        data = minimal()
        data["auth"]["jwt"]["secret"] = "s" * 31
        problem = only(data)
        assert problem.startswith("auth.jwt:") and "32" in problem

    def test_public_key_algorithm_needs_a_key(self) -> None:
        data = minimal()
        data["auth"]["jwt"] = {"algorithms": ["ES256"]}
        assert "auth.jwt.public_key" in only(data)

    @pytest.mark.parametrize("policy", ["queue", "Replace", ""])
    def test_one_stream_per_consumer_is_replace_or_reject(self, policy: str) -> None:
        problem = only(minimal(limits={"one_stream_per_consumer": policy}))
        assert problem.startswith("limits.one_stream_per_consumer:")

    @pytest.mark.parametrize("url", ["https://api.example.com/api/v1", "api.example.com", "ftp://x.example",
                                     "https://api.example.com/?q=1"])
    def test_base_url_must_be_origin_only(self, url: str) -> None:
        assert only(minimal(upstream={"base_url": url})).startswith("upstream.base_url:")

    def test_allowed_origins_must_be_origins(self) -> None:
        assert only(minimal(server={"allowed_origins": ["https://app.example.com/path"]})).startswith(
            "server.allowed_origins:")

    def test_redis_broker_needs_url(self) -> None:
        assert "broker.url" in only(minimal(broker={"kind": "redis"}))

    def test_all_problems_reported_together(self) -> None:
        data = minimal(server={"port": "x", "extra": 1}, limits={"one_stream_per_consumer": "queue"},
                       upstream={"base_url": "https://x.example/path"}, broker={"kind": "redis"})
        data["auth"]["jwt"]["algorithms"] = ["none"]
        found = problems(data)
        keys = {p.split(":")[0] for p in found}
        assert {"server.port", "server.extra", "limits.one_stream_per_consumer", "upstream.base_url",
                "broker", "auth.jwt.algorithms"} <= keys
        assert len(found) >= 6

    def test_env_and_validation_problems_reported_together(self) -> None:
        found = problems(minimal(upstream={"api_key": "${MISSING}"}, server={"port": -1}))
        assert len(found) >= 2
        assert any(p.startswith("upstream.api_key: environment variable MISSING") for p in found)
        assert any(p.startswith("server.port:") for p in found)

    def test_missing_auth_section_does_not_hide_other_problems(self) -> None:
        found = problems({"upstream": {"api_key": API_KEY}, "server": {"port": "x"}})
        assert any(p.startswith("server.port:") for p in found)
        assert any("auth.jwt.secret" in p for p in found)

    @pytest.mark.parametrize("document", [[1, 2], "text", 3])
    def test_top_level_must_be_a_mapping(self, document: Any) -> None:
        assert only(document) == "top level: expected a mapping of sections"

    def test_input_is_not_mutated(self) -> None:
        data = minimal(upstream={"api_key": "${K}"})
        before = copy.deepcopy(data)
        parse_config(data, {"K": "v"})
        assert data == before


class TestAdmin:
    ADMIN = "adm-" + "a" * 36

    def test_off_by_default(self) -> None:
        config = parse_config(minimal(), {})
        assert config.admin.api_key is None and config.secrets() == (API_KEY, SECRET)

    def test_key_from_env_or_file_is_a_secret(self, tmp_path: Path) -> None:
        config = parse_config(minimal(admin={"api_key": "${ADMIN}"}), {"ADMIN": self.ADMIN})
        assert config.admin.api_key == self.ADMIN and self.ADMIN in config.secrets()
        assert self.ADMIN not in repr(config)
        key = tmp_path / "admin-key"
        key.write_text(self.ADMIN + "\n")
        assert parse_config(minimal(admin={"api_key_file": str(key)}), {}).admin.api_key == self.ADMIN
        both = only(minimal(admin={"api_key": self.ADMIN, "api_key_file": str(key)}))
        assert both.startswith("admin.api_key_file:")

    def test_short_shared_or_unset_keys_are_refused(self) -> None:
        short = only(minimal(admin={"api_key": "tiny-admin-key"}))
        assert short.startswith("admin.api_key:") and "32" in short and "tiny-admin-key" not in short
        unset = problems(minimal(admin={"api_key": "${ADMIN}"}))
        assert "admin.api_key: environment variable ADMIN is not set" in unset
        assert "must differ" in only(minimal(admin={"api_key": "s" * 32}))  # the JWT secret
        assert "must differ" in only(minimal(upstream={"api_key": self.ADMIN}, admin={"api_key": self.ADMIN}))


class TestSecretFiles:
    def test_api_key_file(self, tmp_path: Path) -> None:
        key = tmp_path / "api-key"
        key.write_text("from-file\n")
        data = minimal()
        data["upstream"] = {"api_key_file": str(key)}
        assert parse_config(data, {}).upstream.api_key == "from-file"

    def test_secret_file(self, tmp_path: Path) -> None:
        secret = tmp_path / "jwt"
        secret.write_text("f" * 40 + "\n")
        data = minimal()
        data["auth"]["jwt"] = {"secret_file": str(secret)}
        assert parse_config(data, {}).auth.jwt.secret == "f" * 40

    def test_short_secret_in_file_is_refused(self, tmp_path: Path) -> None:
        secret = tmp_path / "jwt"
        secret.write_text("short")
        data = minimal()
        data["auth"]["jwt"] = {"secret_file": str(secret)}
        assert "32" in only(data)

    def test_file_path_from_env(self, tmp_path: Path) -> None:
        key = tmp_path / "api-key"
        key.write_text("k")
        data = minimal()
        data["upstream"] = {"api_key_file": "${KEY_DIR}/api-key"}
        assert parse_config(data, {"KEY_DIR": str(tmp_path)}).upstream.api_key == "k"

    def test_key_and_file_both_set(self, tmp_path: Path) -> None:
        key = tmp_path / "api-key"
        key.write_text("from-file")
        assert only(minimal(upstream={"api_key_file": str(key)})).startswith("upstream.api_key_file:")

    def test_secret_and_file_both_set(self, tmp_path: Path) -> None:
        secret = tmp_path / "jwt"
        secret.write_text("f" * 40)
        data = minimal()
        data["auth"]["jwt"]["secret_file"] = str(secret)
        assert only(data).startswith("auth.jwt.secret_file:")

    def test_unreadable_files_name_their_keys(self, tmp_path: Path) -> None:
        data = {"upstream": {"api_key_file": str(tmp_path / "absent")},
                "auth": {"jwt": {"secret_file": str(tmp_path)}}}  # a directory cannot be read
        found = problems(data)
        assert any(p.startswith("upstream.api_key_file: cannot read") and "absent" in p for p in found)
        assert any(p.startswith("auth.jwt.secret_file: cannot read") for p in found)

    def test_non_string_file_is_a_problem(self) -> None:
        assert "upstream.api_key_file" in " ".join(problems({"upstream": {"api_key_file": 123},
                                                             "auth": {"jwt": {"secret": SECRET}}}))

    def test_file_contents_never_appear_in_problems(self, tmp_path: Path) -> None:
        secret = tmp_path / "jwt"
        secret.write_text("tiny-secret-value")
        data = minimal()
        data["auth"]["jwt"] = {"secret_file": str(secret)}
        assert "tiny-secret-value" not in " ".join(problems(data))


class TestLoadConfig:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "absent.yaml", {})
        assert "cannot read" in info.value.problems[0]

    def test_invalid_yaml(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text("server: [unclosed\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, {})
        assert "not valid YAML" in info.value.problems[0]

    def test_yaml_problems_are_all_reported(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.yaml"
        path.write_text("upstream:\n  api_key: ${NOPE}\nserver:\n  port: x\n  colour: blue\n"
                        "auth:\n  jwt:\n    secret: ${GATEWAY_JWT_SECRET}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, {"GATEWAY_JWT_SECRET": SECRET})
        keys = {p.split(":")[0] for p in info.value.problems}
        assert {"upstream.api_key", "server.port", "server.colour"} <= keys


class TestExampleConfig:
    ENV = {"STRATIX_API_KEY": "ll_live_example_key", "GATEWAY_JWT_SECRET": "j" * 40}

    def test_example_loads_with_env(self) -> None:
        config = load_config(EXAMPLE, self.ENV)
        assert config.upstream.api_key == self.ENV["STRATIX_API_KEY"]
        assert config.auth.jwt.secret == self.ENV["GATEWAY_JWT_SECRET"]
        assert config.auth.jwt.algorithms == ("HS256",)

    def test_example_states_the_defaults(self) -> None:
        # The example claims "the value shown is the default": loading it must equal loading nothing.
        from_example = load_config(EXAMPLE, self.ENV)
        from_defaults = parse_config({"upstream": {"api_key": self.ENV["STRATIX_API_KEY"]},
                                      "auth": {"jwt": {"secret": self.ENV["GATEWAY_JWT_SECRET"]}}}, {})
        assert from_example == from_defaults

    def test_example_fails_without_env(self) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(EXAMPLE, {})
        joined = "\n".join(info.value.problems)
        assert "STRATIX_API_KEY" in joined and "GATEWAY_JWT_SECRET" in joined

    def test_example_holds_no_secret_literal(self) -> None:
        document = yaml.safe_load(EXAMPLE.read_text())
        secret_keys = {"api_key", "secret", "url", "public_key"}

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{path}.{key}" if path else key)
            elif path.rsplit(".", 1)[-1] in secret_keys and node is not None:
                assert isinstance(node, str) and re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", node), path

        walk(document, "")
        assert document["upstream"]["api_key"] == "${STRATIX_API_KEY}"
        assert document["auth"]["jwt"]["secret"] == "${GATEWAY_JWT_SECRET}"


class TestIsolationKeys:
    """The keys and refusals of issue 13, with their defaults."""

    def test_defaults(self) -> None:
        config = parse_config(minimal(), {})
        assert config.upstream.max_event_bytes == 1 << 20
        assert config.upstream.max_response_bytes == 4 << 20
        assert config.limits.max_streams_per_consumer == 64
        assert config.limits.ended_history_bytes == 256 << 20
        assert (config.auth.authorize_concurrency, config.auth.authorize_failure_ttl) == (16, 5.0)

    def test_any_origin_is_refused_with_a_reason(self) -> None:
        [problem] = problems(minimal(server={"allowed_origins": ["https://ok.example", "*"]}))
        assert problem.startswith("server.allowed_origins: '*' is refused")

    def test_jwks_needs_an_audience(self) -> None:
        data = minimal()
        data["auth"]["jwt"] = {"algorithms": ["ES256"], "jwks_url": "https://idp.example.com/jwks"}
        [problem] = problems(data)
        assert problem.startswith("auth.jwt: auth.jwt.audience is required with jwks_url")

    def test_key_prefix_cannot_break_hash_tags(self) -> None:
        [problem] = problems(minimal(broker={"kind": "redis", "url": "redis://r", "key_prefix": "{gw}:"}))
        assert problem.startswith("broker.key_prefix: must not contain")

    def test_bounds(self) -> None:
        found = problems(minimal(upstream={"max_event_bytes": 10}, limits={"max_streams_per_consumer": 0},
                                 auth={"authorize_concurrency": 0}))
        assert sorted(p.split(":")[0] for p in found) == [
            "auth.authorize_concurrency", "limits.max_streams_per_consumer", "upstream.max_event_bytes"]

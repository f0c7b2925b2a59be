"""Issue 11: every key from the environment, precedence, per-command flags, raw client properties."""

from __future__ import annotations

import base64
import json

import pytest

from kafka_backup.cli.main import build_parser
from kafka_backup.schemas import kafka_admin
from kafka_backup.schemas.config import (
    COMMAND_SECTIONS,
    ConfigError,
    all_keys,
    env_for,
    flag_for,
    keys_for,
    load,
)
from kafka_backup.streams.app import faust_credentials


def test_every_key_has_an_environment_variable_and_precedence_is_flags_env_file_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics:\n  port: 9100\n  bind: 0.0.0.0\n  path: /m\nbackup:\n  topics: [x]\n")
    env = {"KAFKA_BACKUP_METRICS_PORT": "9200", "KAFKA_BACKUP_METRICS_BIND": "10.0.0.1",
           "KAFKA_BACKUP_BACKUP_TOPICS": "a, b", "KAFKA_BACKUP_BACKUP_CONTINUOUS": "true",
           "KAFKA_BACKUP_RESTORE_FROM_TIME": "5", "KAFKA_BACKUP_LOG_FORMAT": "json", "KAFKA_BACKUP_METRICS_PATH": ""}
    cfg = load(str(path), {"metrics.port": "9300"}, environ=env)
    assert cfg.metrics.port == 9300  # flag > environment
    assert cfg.metrics.bind == "10.0.0.1"  # environment > file
    assert cfg.metrics.path == "/m"  # an empty variable is unset
    assert (cfg.backup.topics, cfg.backup.continuous, cfg.restore.from_time, cfg.log.format) == (
        ["a", "b"], True, 5, "json")
    assert cfg.metrics.update_interval_ms == 500  # default
    assert len({env_for(k) for k, _ in all_keys()}) == len(all_keys())


@pytest.mark.parametrize("env,needle", [
    ({"KAFKA_BACKUP_METRICS_PORT": "eighty"},
     "environment KAFKA_BACKUP_METRICS_PORT: Expected `int`, got `str` (metrics.port)"),
    ({"KAFKA_BACKUP_METRICS_PORT": "70000"},
     "environment KAFKA_BACKUP_METRICS_PORT: Expected `int` <= 65535 (metrics.port)"),
    ({"KAFKA_BACKUP_BACKUP_COMPRESSION": "brotli"},
     "environment KAFKA_BACKUP_BACKUP_COMPRESSION: Invalid enum value 'brotli'; one of zstd, lz4, snappy, gzip, none (backup.compression)"),
    ({"KAFKA_BACKUP_KAFKA_PROPERTIES": "no equals sign"},
     "environment KAFKA_BACKUP_KAFKA_PROPERTIES: line 1 is not KEY=VALUE"),
    ({"KAFKA_BACKUP_KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"},
     "environment KAFKA_BACKUP_KAFKA_SASL_PASSWORD_FILE: cannot read /nonexistent/pw: No such file or directory"),
])
def test_a_bad_environment_value_names_the_variable(env, needle):
    with pytest.raises(ConfigError) as err:
        load(None, None, environ=env)
    assert str(err.value) == needle


def test_a_secret_and_its_file_are_one_setting_across_sources(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  sasl_password: from-yaml\n")
    env = {"KAFKA_BACKUP_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "pw")}
    assert load(str(path), None, environ=env).kafka.sasl_password == "from-file"  # env's file beats the yaml
    assert load(str(path), {"kafka.sasl_password": "flag"}, environ=env).kafka.sasl_password == "flag"
    with pytest.raises(ConfigError, match="^kafka.sasl_password_file: set either"):
        load(None, None, environ={**env, "KAFKA_BACKUP_KAFKA_SASL_PASSWORD": "x"})


def test_the_parser_built_for_one_command_gives_it_every_flag_of_the_full_one():
    """``main`` builds only the flags of the command it runs (25 ms a start otherwise)."""
    def subparsers(parser):
        return next(a for a in parser._actions if a.dest == "command").choices

    full = subparsers(build_parser())
    for command, whole in full.items():
        alone = subparsers(build_parser(command))
        assert alone.keys() == full.keys()  # every command is still listed, with its help
        assert sorted(alone[command]._option_string_actions) == sorted(whole._option_string_actions), command
        assert alone[command].format_help() == whole.format_help(), command


def test_each_command_shows_its_own_settings_only():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    exporter_help = sub["exporter"].format_help()
    assert "--metrics-port" in exporter_help and "--app-id" in exporter_help
    for foreign in ("--restore-id", "--offset-reset-group", "--group", "--topic-map", "--backup-compression",
                    "--aggregator-dead-letter-topic", "--telemetry-partitions"):
        assert foreign not in exporter_help, foreign
    assert "--metrics-port" not in sub["backup"].format_help()
    assert "--group" in sub["offset-reset"].format_help()
    for command in COMMAND_SECTIONS:
        shown = sub[command].format_help()
        for key, _ in keys_for(command):
            if key not in ("backup.backup_id", "restore.backup_id", "verify.backup_id"):  # aliased --backup-id
                assert flag_for(key) in shown or key in shown, (command, key)


def test_raw_properties_reach_every_client_and_the_aggregator_or_are_refused(tmp_path):
    (tmp_path / "client.properties").write_text("# as for kafka-consumer-groups --command-config\n"
                                                "sasl.username=from-file\nsasl.password=pw\n"
                                                "socket.keepalive.enable=true\nreconnect.backoff.ms=100\n")
    cfg = load(None, {"kafka.properties": {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256"},
                      "kafka.properties_file": str(tmp_path / "client.properties")}, environ={})
    sec = kafka_admin.source_security(cfg.kafka)  # the credentials in the file satisfy the SASL check
    kafka_admin.register("props:9092", sec)
    conf = kafka_admin.client_config("props:9092", **{"group.id": "g"})
    assert (conf["security.protocol"], conf["sasl.mechanism"], conf["sasl.username"], conf["socket.keepalive.enable"],
            conf["group.id"]) == ("SASL_PLAINTEXT", "SCRAM-SHA-256", "from-file", "true", "g")
    assert conf["reconnect.backoff.ms"] == "100"  # a raw property wins over our default (20)
    creds = faust_credentials(sec)
    assert (creds.username, creds.password, str(creds.mechanism.value)) == ("from-file", "pw", "SCRAM-SHA-256")

    # GSSAPI maps to aiokafka's Kerberos credentials (this librdkafka build has no GSSAPI, so no check here)
    gss = kafka_admin.Security("SASL_PLAINTEXT", properties=(("sasl.mechanism", "GSSAPI"),
                                                              ("sasl.kerberos.service.name", "kafka-prod")))
    creds = faust_credentials(gss)
    assert (type(creds).__name__, creds.kerberos_service_name) == ("GSSAPICredentials", "kafka-prod")

    oauth = load(None, {"kafka.properties": {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example/token", "sasl.oauthbearer.client.id": "c",
        "sasl.oauthbearer.client.secret": "s"}}, environ={})
    sec = kafka_admin.source_security(oauth.kafka)
    assert sec.librdkafka()["sasl.oauthbearer.method"] == "oidc"
    creds = faust_credentials(sec)  # the OIDC method maps to an aiokafka token provider (streams/oidc.py)
    assert (type(creds).__name__, creds.oauth_cb.url, creds.oauth_cb.client_id) == (
        "OAuthCredentials", "https://idp.example/token", "c")
    unsecured = kafka_admin.Security("SASL_SSL", properties=(("sasl.mechanism", "OAUTHBEARER"),))
    with pytest.raises(ConfigError) as err:  # librdkafka's default (unsecured test tokens): no equivalent
        faust_credentials(unsecured)
    assert str(err.value).startswith("kafka.properties: sasl.mechanism=OAUTHBEARER is supported by the aggregator "
                                     "with sasl.oauthbearer.method=oidc only")
    # any other security setting aiokafka has no equivalent for is refused by name
    with pytest.raises(ConfigError) as err:
        faust_credentials(kafka_admin.Security("SSL", properties=(("ssl.crl.location", "/crl.pem"),)))
    assert str(err.value).startswith("kafka.properties: ssl.crl.location is not supported by the aggregator")


def test_repeated_property_flags_merge_over_the_environment(monkeypatch):
    from kafka_backup.cli.main import config_from

    args = build_parser().parse_args(["backup", "--kafka-property", "client.rack=a", "--kafka-property",
                                      "socket.timeout.ms=5000", "--kafka-property", "client.rack=b"])
    monkeypatch.setenv("KAFKA_BACKUP_KAFKA_PROPERTIES", "{client.id: env, client.rack: env}")
    cfg = config_from(args)
    assert cfg.kafka.properties == {"client.id": "env", "client.rack": "b", "socket.timeout.ms": "5000"}


def test_up_hands_its_configuration_to_every_process_it_starts(tmp_path, monkeypatch):
    """Each child's own command line and environment, read back by the child's own parser and loader."""
    from kafka_backup.cli.main import config_from, overrides_of
    from kafka_backup.cli.up import child_commands, child_env

    (tmp_path / "pw").write_text("kafka-pw\n")
    (tmp_path / "key").write_text("k" * 32 + "\n")
    (tmp_path / "c.yaml").write_text("aggregator:\n  throughput_window_s: 30\nbackup:\n  poll_interval_ms: 250\n")
    monkeypatch.setenv("KAFKA_BACKUP_METRICS_MAX_CONNECTIONS", "7")  # from up's environment
    args = build_parser().parse_args([
        "up", "--config", str(tmp_path / "c.yaml"), "--bootstrap-servers", "b:9092",
        "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-username", "u",
        "--kafka-sasl-password-file", str(tmp_path / "pw"), "--telemetry-topic", "tele",
        "--telemetry-signing-key-file", str(tmp_path / "key"), "--metrics-basic-auth-username", "prom",
        "--kafka-property", "client.rack=r1", "--log-format", "json", "--app-id", "agg1", "--metrics-port", "9999"])
    cfg = config_from(args)
    children = child_commands(cfg, overrides_of(args), str(tmp_path / "c.yaml"), "b:9092", False, "file:///s")
    assert [c for c, _ in children] == ["aggregate", "exporter", "backup"]
    seen = {}
    for command, argv in children:
        assert "kafka-pw" not in " ".join(argv)  # secrets travel in the environment only
        env = child_env(command, overrides_of(args))
        monkeypatch.setattr("os.environ", env)
        seen[command] = config_from(build_parser().parse_args(argv[3:]))
    for command, child in seen.items():
        assert (child.kafka.security_protocol, child.kafka.sasl_username, child.kafka.sasl_password,
                child.kafka.properties, child.log.format) == ("SASL_SSL", "u", "kafka-pw", {"client.rack": "r1"},
                                                              "json"), command
    for command in ("aggregate", "backup"):
        assert (seen[command].telemetry.topic, seen[command].telemetry.signing_key_file) == (
            "tele", str(tmp_path / "key"))
    assert seen["aggregate"].aggregator.throughput_window_s == 30  # from the forwarded --config
    assert seen["backup"].backup.poll_interval_ms == 250
    assert (seen["exporter"].metrics.basic_auth_username, seen["exporter"].metrics.port,
            seen["exporter"].metrics.max_connections, seen["exporter"].aggregator.app_id) == ("prom", 9999, 7, "agg1")


@pytest.mark.parametrize("props,needle", [
    ({"foo.bar": "1"}, 'kafka.properties: No such configuration property: "foo.bar"'),
    ({"socket.timeout.ms": "soon"}, 'kafka.properties: Invalid value for configuration property "socket.timeout.ms"'),
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc"},
     "kafka.properties: `sasl.oauthbearer.token.endpoint.url` is mandatory when `sasl.oauthbearer.method=oidc`"),
])
def test_librdkafka_refuses_bad_properties_in_one_line_before_any_client(props, needle):
    cfg = load(None, {"kafka.properties": props}, environ={})
    with pytest.raises(ConfigError) as err:
        kafka_admin.source_security(cfg.kafka)
    assert str(err.value).startswith(needle), str(err.value)


@pytest.mark.e2e
def test_the_aggregator_refuses_unsecured_oauthbearer_in_one_line_before_connecting():
    from tests.conftest import cli

    r = cli("aggregate", "--bootstrap-servers", "127.0.0.1:1", "--kafka-property", "security.protocol=SASL_SSL",
            "--kafka-property", "sasl.mechanism=OAUTHBEARER", timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("kafka-backup aggregate: error: kafka.properties: sasl.mechanism=OAUTHBEARER is "
                               "supported by the aggregator with sasl.oauthbearer.method=oidc only"), r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_bad_values_from_the_file_or_a_flag_name_their_source(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics:\n  port: -3\n")
    with pytest.raises(ConfigError) as err:
        load(str(path), None, environ={})
    assert str(err.value).startswith(f"metrics.port: Expected `int` >= 0 (from --config {path}; ")
    with pytest.raises(ConfigError) as err:  # the flag wins over the file, and is the one named
        load(str(path), {"metrics.port": "70000"}, environ={"KAFKA_BACKUP_METRICS_PORT": "9"})
    assert str(err.value).startswith("metrics.port: Expected `int` <= 65535 (from --metrics-port; ")


def test_the_aggregators_oidc_token_provider_does_the_client_credentials_grant_and_reuses_the_token():
    import asyncio
    import http.server
    import threading
    import urllib.parse

    seen = []

    class TokenEndpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            seen.append((self.headers["Authorization"], urllib.parse.parse_qs(body)))
            answer = json.dumps({"access_token": f"token-{len(seen)}", "expires_in": 3600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sec = kafka_admin.Security("SASL_PLAINTEXT", properties=(
            ("sasl.mechanism", "OAUTHBEARER"), ("sasl.oauthbearer.method", "oidc"),
            ("sasl.oauthbearer.token.endpoint.url", f"http://127.0.0.1:{server.server_port}/token"),
            ("sasl.oauthbearer.client.id", "agg"), ("sasl.oauthbearer.client.secret", "s3cret"),
            ("sasl.oauthbearer.scope", "kafka"), ("sasl.oauthbearer.extensions", "logicalCluster=lkc-1")))
        provider = faust_credentials(sec).oauth_cb
        assert asyncio.run(provider.token()) == "token-1"
        assert asyncio.run(provider.token()) == "token-1"  # reused until a minute before it expires
        assert provider.extensions() == {"logicalCluster": "lkc-1"}
    finally:
        server.shutdown()
    assert seen == [("Basic " + base64.b64encode(b"agg:s3cret").decode(),
                     {"grant_type": ["client_credentials"], "scope": ["kafka"]})]


def test_aggregator_data_dir_reaches_faust(tmp_path):
    from kafka_backup.streams.app import create_app

    where = str(tmp_path / "agg-data")
    cfg = load(None, None, environ={"KAFKA_BACKUP_AGGREGATOR_DATA_DIR": where})
    assert cfg.aggregator.data_dir == where
    assert str(create_app(cfg).conf.datadir) == where
    default = create_app(load(None, None, environ={}))
    assert str(default.conf.datadir) != where  # unset: Faust's own default, not ours

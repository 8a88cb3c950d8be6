"""Kafka client security: configuration validation, the aiokafka / Faust kwargs builders
(streams/kafka_security.py), and an end-to-end check against a local broker with a
SASL_PLAINTEXT listener (deploy/local/kafka.sh, KAFKA_SASL_PORT) that right credentials
are accepted and wrong ones refused."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from pydantic import ValidationError

from schemas.codec import encode
from schemas.models import Tier, TieredRequest
from streams import processes
from streams.broker import LocalBroker
from streams.kafka_security import (
    KafkaSecurityError,
    aiokafka_kwargs,
    read_sasl_password,
)
from streams.processes import simulator_env
from streams.runtime.credentials import faust_settings
from tests.support import Pipeline, collect, wait_until
from topologies.config import ConfigError, KafkaSettings, load_settings

SECRET = "s3cr3t-Pa55w0rd-do-not-leak"


def sasl(**overrides: Any) -> KafkaSettings:
    fields: dict[str, Any] = {
        "bootstrap_servers": "a:9092, b:9093",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "alice",
    }
    fields.update(overrides)
    return KafkaSettings(**fields)


# --------------------------------------------------------------------------- config


def test_defaults_are_plaintext_without_credentials() -> None:
    kafka = load_settings(environ={}).kafka
    assert kafka.security_protocol == "PLAINTEXT"
    assert (kafka.sasl_mechanism, kafka.sasl_username, kafka.sasl_password_file) == (None, None, None)
    assert kafka.sasl_password_env == "KAFKA_SASL_PASSWORD"
    assert (kafka.ssl_cafile, kafka.ssl_certfile, kafka.ssl_keyfile) == (None, None, None)


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("missing", ["sasl_mechanism", "sasl_username"])
def test_sasl_requires_mechanism_and_username(protocol: str, missing: str) -> None:
    with pytest.raises(ValidationError) as info:
        sasl(security_protocol=protocol, **{missing: None})
    assert f"{missing} is required when security_protocol is {protocol}" in str(info.value)


def test_sasl_validation_error_names_the_field_through_load_settings() -> None:
    env = {
        "TIERSTREAM__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "TIERSTREAM__KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert "kafka: " in str(info.value)
    assert "sasl_username is required when security_protocol is SASL_SSL" in str(info.value)


def test_unknown_protocol_and_mechanism_are_rejected() -> None:
    with pytest.raises(ValidationError, match="security_protocol"):
        KafkaSettings(security_protocol="SASL")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="sasl_mechanism"):
        sasl(sasl_mechanism="GSSAPI")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sasl_username", "alice", "sasl_username is set but security_protocol is PLAINTEXT"),
        ("sasl_mechanism", "PLAIN", "sasl_mechanism is set but security_protocol is PLAINTEXT"),
        ("ssl_cafile", "/ca.pem", "ssl_cafile is set but security_protocol is PLAINTEXT"),
    ],
)
def test_security_settings_without_a_protocol_that_uses_them_are_refused(
    field: str, value: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSettings(**{field: value})


def test_keyfile_needs_certfile() -> None:
    with pytest.raises(ValidationError, match="ssl_keyfile is set without ssl_certfile"):
        KafkaSettings(security_protocol="SSL", ssl_keyfile=Path("/k.pem"))


def test_password_field_does_not_exist_in_the_config() -> None:
    with pytest.raises(ValidationError, match="sasl_password"):
        sasl(sasl_password=SECRET)


def test_default_yaml_documents_every_kafka_security_key() -> None:
    text = (Path(__file__).resolve().parents[1] / "topologies" / "default.yaml").read_text()
    for key in (
        "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password_env",
        "sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile",
    ):  # fmt: skip
        assert f"# {key}:" in text


# --------------------------------------------------------------------------- password


def test_password_from_env_then_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text("from-file\n")
    kafka = sasl(sasl_password_env="MY_KAFKA_PW", sasl_password_file=secret_file)

    assert read_sasl_password(kafka, {"MY_KAFKA_PW": "from-env"}) == "from-env"
    assert read_sasl_password(kafka, {"MY_KAFKA_PW": ""}) == "from-file"
    assert read_sasl_password(kafka, {}) == "from-file"
    assert read_sasl_password(sasl(), {}) is None


def test_unreadable_password_file_names_the_setting(tmp_path: Path) -> None:
    kafka = sasl(sasl_password_file=tmp_path / "absent")
    with pytest.raises(KafkaSecurityError, match=r"kafka\.sasl_password_file: cannot read .*absent"):
        read_sasl_password(kafka, {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(KafkaSecurityError, match="is empty"):
        read_sasl_password(sasl(sasl_password_file=tmp_path / "empty"), {})


def test_missing_password_error_names_the_env_setting() -> None:
    kafka = sasl(sasl_password_env="ALICE_PW")
    for build in (aiokafka_kwargs, faust_settings):
        with pytest.raises(KafkaSecurityError) as info:
            build(kafka, {})
        message = str(info.value)
        assert "kafka.sasl_password_env" in message and "ALICE_PW" in message
        assert isinstance(info.value, ConfigError)


# --------------------------------------------------------------------------- kwargs


def test_plaintext_kwargs() -> None:
    kafka = KafkaSettings(bootstrap_servers="a:9092, b:9093")
    assert aiokafka_kwargs(kafka, {}) == {
        "bootstrap_servers": ["a:9092", "b:9093"],
        "security_protocol": "PLAINTEXT",
    }
    assert faust_settings(kafka, {}) == {"broker": "kafka://a:9092;kafka://b:9093"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_kwargs(mechanism: str) -> None:
    kafka = sasl(sasl_mechanism=mechanism)
    kwargs = aiokafka_kwargs(kafka, {"KAFKA_SASL_PASSWORD": SECRET})
    assert kwargs == {
        "bootstrap_servers": ["a:9092", "b:9093"],
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "alice",
        "sasl_plain_password": SECRET,
    }

    settings = faust_settings(kafka, {"KAFKA_SASL_PASSWORD": SECRET})
    assert settings["broker"] == "kafka://a:9092;kafka://b:9093"
    creds = settings["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.protocol.value, creds.mechanism.value) == ("SASL_PLAINTEXT", mechanism)
    assert (creds.username, creds.password, creds.ssl_context) == ("alice", SECRET, None)


def test_sasl_ssl_kwargs_carry_a_verifying_tls_context() -> None:
    kafka = sasl(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", ssl_cafile=Path(certifi.where()))
    kwargs = aiokafka_kwargs(kafka, {"KAFKA_SASL_PASSWORD": SECRET})
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED

    creds = faust_settings(kafka, {"KAFKA_SASL_PASSWORD": SECRET})["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.protocol.value, creds.mechanism.value) == ("SASL_SSL", "SCRAM-SHA-512")
    assert isinstance(creds.ssl_context, ssl.SSLContext)


def test_ssl_kwargs() -> None:
    kafka = KafkaSettings(security_protocol="SSL", bootstrap_servers="k:9094")
    kwargs = aiokafka_kwargs(kafka, {})
    assert set(kwargs) == {"bootstrap_servers", "security_protocol", "ssl_context"}
    assert kwargs["security_protocol"] == "SSL"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)

    creds = faust_settings(kafka, {})["broker_credentials"]
    assert isinstance(creds, faust.SSLCredentials)
    assert creds.protocol.value == "SSL" and isinstance(creds.context, ssl.SSLContext)


def test_bad_tls_file_error_names_the_setting(tmp_path: Path) -> None:
    kafka = KafkaSettings(security_protocol="SSL", ssl_certfile=tmp_path / "nope.pem")
    with pytest.raises(KafkaSecurityError, match=r"kafka\.ssl_certfile=.*nope\.pem"):
        aiokafka_kwargs(kafka, {})


def test_kwargs_unpack_into_real_clients_without_connecting() -> None:
    """The shapes are what aiokafka's constructors accept (no network until start())."""
    kwargs = aiokafka_kwargs(sasl(sasl_mechanism="SCRAM-SHA-256"), {"KAFKA_SASL_PASSWORD": SECRET})

    async def build() -> None:
        AIOKafkaProducer(**kwargs)
        AIOKafkaConsumer("t", **kwargs)
        AIOKafkaAdminClient(**kwargs)

    asyncio.run(build())


def test_secret_never_in_repr_str_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    env = {"KAFKA_SASL_PASSWORD": SECRET}
    kafka = sasl(security_protocol="SASL_SSL", ssl_cafile=Path(certifi.where()))

    kwargs = aiokafka_kwargs(kafka, env)
    settings = faust_settings(kafka, env)
    shown = [repr(kwargs), str(kwargs), f"{kwargs}", repr(settings), str(settings)]
    shown += [repr(settings["broker_credentials"]), repr(kafka), repr(load_settings(environ=env))]
    for text in shown:
        assert SECRET not in text
    assert "'sasl_plain_password': '***'" in repr(kwargs)
    assert kwargs["sasl_plain_password"] == SECRET  # the value itself is intact

    # Errors from a password file never echo its contents.
    secret_dir = tmp_path / "secret-as-dir"
    secret_dir.mkdir()
    with pytest.raises(KafkaSecurityError) as info:
        read_sasl_password(sasl(sasl_password_file=secret_dir), {})
    assert SECRET not in str(info.value)
    bad_utf8 = tmp_path / "binary"
    bad_utf8.write_bytes(SECRET.encode() + b"\xff")
    with pytest.raises(KafkaSecurityError) as info:
        read_sasl_password(sasl(sasl_password_file=bad_utf8), {})
    assert SECRET not in str(info.value) and info.value.__cause__ is None

    assert SECRET not in caplog.text


# --------------------------------------------------------------------------- e2e

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A private broker with a SASL_PLAINTEXT listener, on free ports, stopped at the end."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip(
            "KAFKA_BOOTSTRAP_SERVERS is set: an external broker is in use, and this test "
            "needs its own local broker with a SASL listener"
        )
    broker = LocalBroker.on_free_ports(data_dir=tmp_path_factory.mktemp("kafka-sasl"), sasl_users=USERS)
    try:
        broker.start(timeout=120)
        yield broker
    finally:
        broker.stop()


def client_settings(broker: LocalBroker, mechanism: str, user: str) -> KafkaSettings:
    assert broker.sasl_bootstrap_servers is not None
    return KafkaSettings(
        bootstrap_servers=broker.sasl_bootstrap_servers,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,  # type: ignore[arg-type]
        sasl_username=user,
    )


async def roundtrip(kwargs: dict[str, Any]) -> None:
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(acks="all", **kwargs)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over sasl", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, group_id=f"{topic}-g", auto_offset_reset="earliest", enable_auto_commit=False, **kwargs
    )
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), timeout=30)
        assert (msg.key, msg.value) == (b"k", b"over sasl")
    finally:
        await consumer.stop()


async def authenticate(kwargs: dict[str, Any]) -> None:
    """Open one connection to the SASL listener and authenticate; aiokafka's clients
    turn the broker's refusal into a generic bootstrap error, the connection keeps it."""
    host, port = kwargs["bootstrap_servers"][0].rsplit(":", 1)
    conn_kwargs = {k: v for k, v in kwargs.items() if k != "bootstrap_servers"}
    conn = await asyncio.wait_for(create_conn(host, int(port), **conn_kwargs), timeout=30)
    conn.close()


@pytest.mark.e2e
@pytest.mark.parametrize(("mechanism", "user"), [("PLAIN", "alice"), ("SCRAM-SHA-256", "bob")])
async def test_right_credentials_round_trip(sasl_broker: LocalBroker, mechanism: str, user: str) -> None:
    kafka = client_settings(sasl_broker, mechanism, user)
    kwargs = aiokafka_kwargs(kafka, {"KAFKA_SASL_PASSWORD": USERS[user]})
    await authenticate(kwargs)
    await roundtrip(kwargs)


@pytest.mark.e2e
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
@pytest.mark.parametrize(("user", "password"), [("alice", "wrong-password"), ("mallory", "alice-Secret-1")])
async def test_wrong_credentials_are_refused(
    sasl_broker: LocalBroker, mechanism: str, user: str, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    kwargs = aiokafka_kwargs(client_settings(sasl_broker, mechanism, user), {"KAFKA_SASL_PASSWORD": password})

    with pytest.raises(SaslAuthenticationFailed):
        await authenticate(kwargs)

    # A producer cannot even bootstrap; aiokafka logs the broker's SASL refusal.
    producer = AIOKafkaProducer(request_timeout_ms=10_000, **kwargs)
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(producer.start(), timeout=30)
    await producer.stop()
    assert "SaslAuthenticationFailed" in caplog.text
    assert password not in caplog.text


@pytest.mark.e2e
def test_sasl_broker_config_is_private_and_logs_hold_no_password(sasl_broker: LocalBroker) -> None:
    assert sasl_broker.data_dir is not None
    data_dir = Path(sasl_broker.data_dir)
    config = data_dir / "server.properties"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # The KRaft metadata log holds the SCRAM stored keys.
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    text = config.read_text()
    assert f"SASL_PLAINTEXT://127.0.0.1:{sasl_broker.sasl_port}" in text
    assert "PLAINTEXT://127.0.0.1:" in text and "inter.broker.listener.name=PLAINTEXT" in text
    assert not (data_dir / "format.args").exists()  # the SCRAM argfile is gone
    for log_file in data_dir.glob("*.log*"):
        content = log_file.read_text(errors="replace")
        for password in USERS.values():
            assert password not in content, log_file
    out = data_dir / "kafka.out"
    for password in USERS.values():
        assert password not in out.read_text(errors="replace")
    for password in USERS.values():
        assert password not in repr(sasl_broker)


# --------------------------------------------------------------------------- kafka.sh input


@pytest.mark.parametrize(
    ("users", "message"),
    [
        ("", "KAFKA_SASL_PORT is set but KAFKA_SASL_USERS is empty"),
        ("alice", "an entry has no ':'"),
        ("al ice:pw", "user names may use only"),
        (f'alice:{SECRET}"x', "the password of user 'alice' is empty or has a character outside"),
        ("alice:", "the password of user 'alice' is empty"),
    ],
)
def test_kafka_sh_rejects_bad_sasl_users_without_echoing_passwords(
    tmp_path: Path, users: str, message: str
) -> None:
    """Checked before any JVM starts, so this needs no broker."""
    broker = LocalBroker.on_free_ports(data_dir=tmp_path / "kafka")
    broker.sasl_port = broker.port + 2 if broker.port < 65000 else broker.port - 2
    proc = broker._run("start", timeout=60, env={"KAFKA_SASL_USERS": users})
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stdout
    assert SECRET not in proc.stdout
    assert not (tmp_path / "kafka" / "server.properties").exists()


# --------------------------------------------------------------------------- worker over SASL


def sasl_worker_env(broker: LocalBroker, simulator_port: int, password: str) -> dict[str, str]:
    """A ``tierstream worker`` configured, as in a deployment, through environment
    variables only: the SASL listener, PLAIN as alice, the password in KAFKA_SASL_PASSWORD."""
    assert broker.sasl_bootstrap_servers is not None
    run = uuid.uuid4().hex[:10]
    return {
        "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": broker.sasl_bootstrap_servers,
        "TIERSTREAM__KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "TIERSTREAM__KAFKA__SASL_MECHANISM": "PLAIN",
        "TIERSTREAM__KAFKA__SASL_USERNAME": "alice",
        "KAFKA_SASL_PASSWORD": password,
        "TIERSTREAM__KAFKA__TOPIC_PREFIX": f"sasl{run}",
        "TIERSTREAM__APP_ID": f"ts-sasl-{run}",
        "TIERSTREAM__WORKER__HEALTH_PORT": "0",
        **simulator_env(simulator_port),
    }


def nano_request(request_id: str) -> TieredRequest:
    return TieredRequest(
        request_id=request_id,
        workflow_id="wf-sasl",
        agent_type="router",
        task="Classify this ticket as billing or shipping.",
        max_output_tokens=16,
        tier=Tier.NANO,
        routed_by="hint",
    )


@pytest.mark.e2e
async def test_worker_processes_over_sasl_and_refuses_a_wrong_password(
    sasl_broker: LocalBroker, simulator_port: int, tmp_path: Path
) -> None:
    # Right password: the worker creates its topics, joins its group and answers a
    # tiered request produced over SASL; the result is read back over SASL.
    env = sasl_worker_env(sasl_broker, simulator_port, USERS["alice"])
    pipeline = Pipeline(env=env, settings=load_settings(environ=env), log_dir=tmp_path / "right")
    pipeline.log_dir.mkdir()
    kwargs = pipeline.kafka_kwargs()
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert kwargs["bootstrap_servers"] == [sasl_broker.sasl_bootstrap_servers]
    pipeline.workers.append(
        # the cost role grants the budget leases the call is made under
        processes.spawn(["worker", "--roles", "tier:nano,cost"], env, pipeline.log_dir / "worker.log")
    )
    try:
        topology = pipeline.topology
        request = nano_request(f"sasl-{uuid.uuid4().hex[:8]}")
        # The worker creates the topics itself (over SASL); wait for them rather than
        # let the producer auto-create the tier topic with other settings.
        admin = AIOKafkaAdminClient(**kwargs)
        await admin.start()
        try:

            async def tier_topic_made() -> bool:
                pipeline.assert_workers_alive()
                return topology.tiers[Tier.NANO].name in set(await admin.list_topics())

            await wait_until(tier_topic_made, 90, f"the worker to create its topics (logs in {pipeline.log_dir})",
                             interval=0.5)
        finally:
            await admin.close()
        producer = AIOKafkaProducer(acks="all", **kwargs)
        await producer.start()
        try:
            await producer.send_and_wait(
                topology.tiers[Tier.NANO].name, encode(request), key=request.workflow_id.encode()
            )
        finally:
            await producer.stop()

        collected = await collect(pipeline, expected=1, timeout=120)
        assert collected.dead_letters == [], f"logs in {pipeline.log_dir}"
        assert [r["request_id"] for r in collected.results] == [request.request_id], (
            f"no result; logs in {pipeline.log_dir}"
        )
        result = collected.results[0]
        assert (result["status"], result["tier"], result["provider"]) == ("ok", "nano", "openai")
        assert result["output"]
    finally:
        exit_codes = pipeline.stop_workers()
    assert exit_codes == [0], f"the worker did not stop cleanly; logs in {pipeline.log_dir}"
    leaked = USERS["alice"] in pipeline.logs()  # a bool, so a failure cannot print the password
    assert not leaked, f"the SASL password is in the worker log; logs in {pipeline.log_dir}"

    # Wrong password: the same worker (its own topic prefix and group) fails in its first
    # step, creating the topics: aiokafka logs the broker's SASL refusal, the admin client
    # raises KafkaConnectionError ("Unable to bootstrap") and the process exits 1 with that
    # traceback, before any topic exists or Faust starts.
    wrong = "wrong-password-for-alice"
    bad_env = sasl_worker_env(sasl_broker, simulator_port, wrong)
    log = tmp_path / "wrong-worker.log"
    worker = processes.spawn(["worker", "--roles", "tier:nano"], bad_env, log)
    try:
        returncode = await asyncio.to_thread(worker.wait, 120)
    except subprocess.TimeoutExpired:
        processes.stop(worker)
        pytest.fail(f"a worker with a wrong password was still running after 120s; log {log}")
    output = log.read_text(errors="replace")
    assert returncode == 1, f"log {log}"
    assert "SaslAuthenticationFailed: Authentication failed" in output, f"log {log}"
    assert "KafkaConnectionError: Unable to bootstrap" in output, f"log {log}"
    leaked = wrong in output or USERS["alice"] in output
    assert not leaked, f"a SASL password is in the worker log {log}"
    prefix = bad_env["TIERSTREAM__KAFKA__TOPIC_PREFIX"]
    admin = AIOKafkaAdminClient(**kwargs)
    await admin.start()
    try:
        assert not [t for t in await admin.list_topics() if t.startswith(prefix)]
    finally:
        await admin.close()

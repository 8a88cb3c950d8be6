"""Kafka client security: the connection arguments for aiokafka and Faust.

Both builders read :class:`~topologies.config.KafkaSettings` and return keyword
arguments, so every client in the project (Faust apps, the CLI producer and
consumer, the admin client) authenticates the same way::

    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings.kafka))
    app = faust.App(app_id, **faust_settings(settings.kafka), ...)  # streams.runtime.credentials

The SASL password is never in the configuration. It is read when the kwargs are
built: from the environment variable named by ``kafka.sasl_password_env``, else
from the file ``kafka.sasl_password_file`` (a mounted Kubernetes secret). It is
kept out of ``repr()`` of the returned mappings and out of every error message
raised here.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any

from topologies.config import ConfigError, KafkaSettings

__all__ = [
    "KafkaSecurityError",
    "ClientKwargs",
    "read_sasl_password",
    "ssl_context",
    "aiokafka_kwargs",
    "required_password",
]

_SECRET_KEYS = frozenset({"sasl_plain_password"})
_REDACTED = "'***'"


class KafkaSecurityError(ConfigError):
    """The Kafka security settings cannot be applied (no password, unreadable file...).

    The message names the setting to fix and never contains a secret.
    """


class ClientKwargs(dict[str, Any]):
    """A plain ``dict`` of client keyword arguments whose ``repr()`` (and ``str()``)
    hides the password, so logging the kwargs cannot leak it. ``**kwargs`` unpacking
    and item access return the real values."""

    def __repr__(self) -> str:
        items = ", ".join(
            f"{key!r}: {_REDACTED if key in _SECRET_KEYS and value is not None else repr(value)}"
            for key, value in self.items()
        )
        return "{" + items + "}"

    __str__ = __repr__


def read_sasl_password(kafka: KafkaSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """The SASL password: the env var ``kafka.sasl_password_env`` if set and non-empty,
    else the contents of ``kafka.sasl_password_file`` (one trailing newline removed),
    else ``None``.

    Raises:
        KafkaSecurityError: the password file is configured but cannot be read, or is
            empty.
    """
    environ = os.environ if environ is None else environ
    from_env = environ.get(kafka.sasl_password_env)
    if from_env:
        return from_env
    path = kafka.sasl_password_file
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        # strerror only: never echo file contents.
        raise KafkaSecurityError(
            f"kafka.sasl_password_file: cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise KafkaSecurityError(f"kafka.sasl_password_file: {path} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise KafkaSecurityError(f"kafka.sasl_password_file: {path} is empty")
    return text


def _refuse_key_password() -> str:
    # Called by OpenSSL only for an encrypted key; without this callback it would
    # prompt on the terminal, which hangs a worker.
    raise KafkaSecurityError(
        "kafka.ssl_keyfile is encrypted; only unencrypted private keys are supported"
    )


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The client TLS context for SSL / SASL_SSL (hostname checking on, the system CAs
    unless ``kafka.ssl_cafile`` is set); ``None`` for the other protocols."""
    if not kafka.uses_ssl:
        return None
    from aiokafka.helpers import create_ssl_context

    try:
        return create_ssl_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None,
            certfile=str(kafka.ssl_certfile) if kafka.ssl_certfile else None,
            keyfile=str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
            password=_refuse_key_password,
        )
    except KafkaSecurityError:
        raise
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(
            f"kafka.{name}={getattr(kafka, name)}"
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
            if getattr(kafka, name) is not None
        )
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise KafkaSecurityError(
            f"cannot build the Kafka TLS context ({files or 'system CAs'}): {reason}"
        ) from None


def required_password(kafka: KafkaSettings, environ: Mapping[str, str] | None) -> str:
    password = read_sasl_password(kafka, environ)
    if password is None:
        where = f"the environment variable {kafka.sasl_password_env} (kafka.sasl_password_env)"
        if kafka.sasl_password_file is not None:
            where += f" or the file {kafka.sasl_password_file} (kafka.sasl_password_file)"
        else:
            where += " or kafka.sasl_password_file"
        raise KafkaSecurityError(
            f"kafka.security_protocol is {kafka.security_protocol} with "
            f"{kafka.sasl_mechanism} for user {kafka.sasl_username!r}, but no password "
            f"was found: set {where}"
        )
    return password


def aiokafka_kwargs(kafka: KafkaSettings, environ: Mapping[str, str] | None = None) -> ClientKwargs:
    """Keyword arguments for ``AIOKafkaProducer``, ``AIOKafkaConsumer`` and
    ``AIOKafkaAdminClient``.

    Always ``bootstrap_servers`` (a list of ``host:port``) and ``security_protocol``;
    plus ``ssl_context`` for SSL / SASL_SSL; plus ``sasl_mechanism``,
    ``sasl_plain_username`` and ``sasl_plain_password`` for SASL_PLAINTEXT / SASL_SSL
    (aiokafka uses the ``sasl_plain_*`` pair for PLAIN and SCRAM alike).

    Raises:
        KafkaSecurityError: SASL is configured and no password is found, or the TLS
            files cannot be loaded.
    """
    kwargs = ClientKwargs(
        bootstrap_servers=[h.strip() for h in kafka.bootstrap_servers.split(",") if h.strip()],
        security_protocol=kafka.security_protocol,
    )
    if kafka.uses_ssl:
        kwargs["ssl_context"] = ssl_context(kafka)
    if kafka.uses_sasl:
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.sasl_username
        kwargs["sasl_plain_password"] = required_password(kafka, environ)
    return kwargs

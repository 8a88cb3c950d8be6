"""Faust's connection settings, built from the same Kafka security settings as every other
client's (:mod:`streams.kafka_security`)."""

from __future__ import annotations

from collections.abc import Mapping

import faust

from streams.kafka_security import ClientKwargs, required_password, ssl_context
from topologies.config import KafkaSettings


def faust_settings(kafka: KafkaSettings, environ: Mapping[str, str] | None = None) -> ClientKwargs:
    """Keyword arguments for ``faust.App``: ``broker`` (``kafka://`` URLs) and, unless
    the protocol is PLAINTEXT, ``broker_credentials``:

    * SSL: ``faust.SSLCredentials(context)``;
    * SASL_PLAINTEXT: ``faust.SASLCredentials(username=, password=, mechanism=)``;
    * SASL_SSL: the same with ``ssl_context=`` (Faust then selects SASL_SSL).

    ``faust.SASLCredentials``'s own ``repr()`` shows only the username.
    """
    settings = ClientKwargs(broker=kafka.broker_url)
    context = ssl_context(kafka)
    if kafka.uses_sasl:
        settings["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=required_password(kafka, environ),
            mechanism=kafka.sasl_mechanism,
            ssl_context=context,
        )
    elif context is not None:
        settings["broker_credentials"] = faust.SSLCredentials(context)
    return settings

"""One replica's connection to Redis and its outages, kept apart so the sync code only says what to exchange.

``RedisLink`` opens connections whose every call carries ``state.timeout``, loads the scripts on each
(``redis_scripts.py``), logs one warning when Redis fails (credentials masked) and one more when it
is back, and subscribes to the fleet's channel for the listen thread. ``Backoff`` spaces the retries
of both threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis

from ..secrets import MASK, redact_url
from .redis_scripts import Scripts

if TYPE_CHECKING:
    from ...config import StateConfig

log = logging.getLogger("anorag_integrations.router")

BACKOFF_MIN_S = 0.1
"""First wait before reconnecting to Redis after a failure..."""
BACKOFF_MAX_S = 5.0
"""...doubling up to this."""
LISTEN_POLL_S = 0.5
"""How long the listen thread waits for a message before checking whether it should stop."""


class Backoff:
    """The wait before the next try after a failure: ``BACKOFF_MIN_S``, doubling up to ``BACKOFF_MAX_S``."""

    def __init__(self) -> None:
        self.wait_s = BACKOFF_MIN_S

    def reset(self) -> None:
        """A try succeeded: the next failure waits the least again."""
        self.wait_s = BACKOFF_MIN_S

    def wait(self, stop: threading.Event) -> None:
        """Wait (less if ``stop`` is set meanwhile); the next wait is twice as long."""
        stop.wait(self.wait_s)
        self.wait_s = min(BACKOFF_MAX_S, self.wait_s * 2)


class RedisLink:
    """The sync thread's connection to Redis and the scripts loaded on it; the listen thread opens its own."""

    def __init__(self, config: StateConfig) -> None:
        assert config.url is not None
        self.config = config
        url = config.url.get_secret_value()
        self.url = redact_url(url)
        """The Redis URL as shown (``***@`` for its credentials)."""
        parts = urlsplit(url)
        self._password = unquote(parts.password or "") or next(iter(parse_qs(parts.query).get("password", [])), "")
        self.client: redis.Redis | None = None
        self.scripts: Scripts | None = None
        self.connected = False
        """Whether the last exchange with Redis succeeded (else the router runs on its own state)."""
        self._warned = False

    def renew(self) -> None:
        """In a forked child: forget the parent's connection (it must not be shared) and its outage."""
        self.client, self.connected, self._warned = None, False, False

    def new_client(self) -> redis.Redis:
        assert self.config.url is not None
        timeout = self.config.timeout
        return redis.Redis.from_url(
            self.config.url.get_secret_value(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )

    def connect(self) -> redis.Redis:
        """The connection, opened (with the scripts loaded on it) when there is none."""
        if self.client is None:
            client = self.new_client()
            try:
                self.load_scripts(client)
            except BaseException:
                client.close()
                raise
            self.client = client
        return self.client

    def load_scripts(self, client: redis.Redis) -> None:
        """Load the scripts into ``client``'s Redis (at connect time, and again when Redis forgot them)."""
        self.scripts = Scripts.load(client)

    def lost(self, exc: BaseException) -> None:
        """Redis failed (down, slow, refusing us): drop the connection; warn once per outage."""
        client, self.client = self.client, None
        if client is not None:
            client.close()
        if self.connected or not self._warned:
            log.warning(
                "shared state: Redis at %s unreachable (%s); routing on this replica's own state, retrying",
                self.url,
                self.masked(exc),
            )
            self._warned = True
        else:
            log.debug("shared state: Redis at %s still unreachable: %s", self.url, self.masked(exc))
        self.connected = False

    def up(self, replica: str) -> None:
        """An exchange succeeded: connected, said once when it ends an outage (or is the first)."""
        if self.connected:
            return
        self.connected = True
        if self._warned:
            log.warning("shared state: Redis at %s is back; sharing the fleet's state again", self.url)
        else:
            log.info("shared state: connected to Redis at %s as %s", self.url, replica)

    def close(self, farewell: Callable[[Any], None]) -> None:
        """Close the connection; while connected, send what ``farewell`` queues on a pipeline first (bounded by
        ``timeout``; if Redis went away, the keys' TTLs clean up instead)."""
        client, self.client = self.client, None
        if client is not None and self.connected and self.scripts is not None:
            try:
                pipe = client.pipeline(transaction=False)
                farewell(pipe)
                pipe.execute()
            except Exception as exc:  # Redis went away: the TTLs clean up instead
                log.debug("shared state: could not give back this replica's keys: %s", self.masked(exc))
        if client is not None:
            client.close()
        self.connected = False

    def listen(self, channel: str, stop: threading.Event, heard: Callable[[object], None]) -> None:
        """Hand each message published on ``channel`` to ``heard`` until ``stop`` is set (the listen thread).

        A connection of its own; failures are retried with backoff and logged at debug level only
        (the sync thread reports outages).
        """
        backoff = Backoff()
        while not stop.is_set():
            client = self.new_client()
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                backoff.reset()
                while not stop.is_set():
                    message = pubsub.get_message(timeout=LISTEN_POLL_S)
                    if message is not None:
                        heard(message.get("data"))
            except Exception as exc:  # the sync thread reports outages; this one just retries
                log.debug("shared state: listening for changes failed: %s", self.masked(exc))
                backoff.wait(stop)
            finally:
                client.close()

    def masked(self, exc: BaseException) -> str:
        """``exc`` as text fit to log: the URL's credentials and the password masked."""
        text = redact_url(f"{type(exc).__name__}: {exc}")
        return text.replace(self._password, MASK) if self._password else text

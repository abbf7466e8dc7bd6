"""JSON calls to slurmrestd: one pooled, thread-safe client per adapter, sending
``httpx`` requests through :class:`adapters.slurm_rest.http.StdlibTransport`.

Every call names the POSIX user it acts as; the identity provider adds the
authentication headers. Failures become adapter exceptions here, in one place:

- connection refused / connect timeout / pool exhausted → ``ClusterUnreachable``;
- a timeout or broken connection after a submit was sent → ``SubmitOutcomeUnknown``
  (the job may exist: the broker reconciles by tag, never resubmits blindly); after
  another request → ``ClusterUnreachable``, code ``command_timeout`` for a timeout
  (slurmrestd builds its whole answer first: a big accounting window can take
  longer than ``timeout``, which the usage importer answers by halving it);
- ``errors`` in the body (HTTP 200, 500 or 422 alike) → classified Slurm errors,
  except 22.05's ``[9003] Nothing found`` in a 200 answer, which is an empty result;
- 401/403 → ``AdapterConfigError`` (``auth_failed``), the cached token dropped;
- an answer longer than the caller's ``max_bytes`` → ``OutputTooLarge`` (read as it
  arrives and dropped at the cap, never held whole); an answer with no bound on its
  size is read one list element at a time instead (:meth:`RestClient.stream_items`).
"""

from __future__ import annotations

import codecs
import json
import logging
import ssl
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import httpx

from adapters.slurm_rest import errors as slurm_errors
from adapters.slurm_rest.auth import Identity
from adapters.slurm_rest.http import StdlibTransport
from adapters.slurm_rest.settings import RestSettings
from adapters.slurm_rest.stream import ItemStream
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterUnreachable,
    OutputTooLarge,
    SubmitOutcomeUnknown,
    SubmitRejected,
)

log = logging.getLogger("adapters.slurm_rest")

JsonObject = dict[str, Any]
Params = Mapping[str, str | Sequence[str]]

#: idle connections kept to one slurmrestd: enough for every worker thread of the broker
#: to find one (a call that finds none opens one). httpcore's pool, used before, kept 8
#: of 16: it reconnected at nearly every call above 8 at once and could close a
#: connection under a waiting call (encode/httpcore#1110: a submit then ended as
#: "outcome unknown").
POOL_CONNECTIONS = 32
#: parsed URLs kept per client (paths of one job are parsed anew past it)
_URL_CACHE = 512

#: before the request could reach the server: nothing happened on the cluster
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
#: after (part of) the request may have reached the server
_MAYBE_SENT = (
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


class RestClient:
    """Thread-safe JSON calls to one slurmrestd."""

    def __init__(
        self,
        settings: RestSettings,
        identity: Identity,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._identity = identity
        # A transport, not an httpx.Client around one: the Client's layers (base-URL
        # merge and URL re-parse, cookie jar, auth and redirect handling, event hooks)
        # cost a third of a call's CPU and do nothing for slurmrestd.
        self._transport = transport or StdlibTransport(
            settings.url, timeout=settings.timeout, connect_timeout=settings.connect_timeout,
            max_idle=POOL_CONNECTIONS)
        self._urls: dict[str, httpx.URL] = {}
        self._calls = 0
        self._calls_lock = threading.Lock()

    @property
    def calls(self) -> int:
        """How many HTTP requests this client has sent (for batching checks)."""
        return self._calls

    def close(self) -> None:
        """Close pooled connections."""
        self._transport.close()

    def probe(self) -> int:
        """An unauthenticated GET of ``/openapi/v3``: the HTTP status proves the
        daemon answers (401 is expected). Connection failures raise."""
        try:
            response = self._transport.handle_request(self._build("GET", "/openapi/v3", {}))
            response.close()
            return response.status_code
        except httpx.HTTPError as exc:
            raise self._connect_failure("probe", exc) from exc

    def _url(self, path: str) -> httpx.URL:
        """``path`` under the base URL, parsed once per path (a few fixed paths, plus
        one per job cancelled or checked: the cache is bounded)."""
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self._settings.url + path)
            if len(self._urls) < _URL_CACHE:
                self._urls[path] = url
        return url

    def _build(self, method: str, path: str, headers: dict[str, str], *, params: Params | None = None,
               body: JsonObject | None = None) -> httpx.Request:
        return httpx.Request(method, self._url(path), params=params, json=body,
                             headers={"Accept": "application/json", **headers})

    def _connect_failure(self, during: str, exc: httpx.HTTPError) -> AdapterError:
        """A failure to connect: a TLS mismatch is a definition that cannot work
        (retrying never helps), anything else is "unreachable" (transient)."""
        url = self._settings.url
        tls = _tls_error(exc)
        if tls is not None:
            hint = ("the server does not speak TLS: is it a plain-HTTP slurmrestd (use http://)?"
                    if "WRONG_VERSION_NUMBER" in tls or "record layer failure" in tls.lower()
                    else "check the certificate and the URL")
            return AdapterConfigError(f"slurmrestd {during}: TLS handshake with {url} failed ({tls}); {hint}",
                                      code="tls_error")
        return ClusterUnreachable(f"slurmrestd {during}: cannot connect to {url}: {exc}")

    def get(self, path: str, *, username: str, during: str, params: Params | None = None,
            max_bytes: int | None = None) -> JsonObject:
        """GET ``path`` as ``username``; retried once on a dropped keep-alive connection.
        An answer longer than ``max_bytes`` raises ``OutputTooLarge``."""
        try:
            return self.request("GET", path, username=username, during=during, params=params, max_bytes=max_bytes)
        except ClusterUnreachable as exc:
            if not isinstance(exc.__cause__, httpx.RemoteProtocolError | httpx.ReadError):
                raise
            log.debug("slurm_rest: retrying GET %s after a dropped connection", path)
            return self.request("GET", path, username=username, during=during, params=params, max_bytes=max_bytes)

    def stream_items(self, path: str, *, key: str, username: str, during: str, params: Params | None = None,
                     max_item_bytes: int) -> Generator[Any, None, None]:
        """GET ``path`` as ``username`` and yield the elements of the answer's list
        ``key`` as they arrive (:class:`adapters.slurm_rest.stream.ItemStream`): no cap
        on the answer, ``max_item_bytes`` on one element. Errors in the answer are
        raised after its elements (their place in the object is the version's);
        an error status is read and raised as :meth:`request` would. Retried once
        on a dropped keep-alive connection before the answer began, never after: a
        caller that already took elements decides. Closing the generator early
        closes the connection."""
        headers = self._identity.headers(username)
        with self._calls_lock:
            self._calls += 1
        try:
            try:
                response = self._transport.handle_request(self._build("GET", path, headers, params=params))
            except (httpx.RemoteProtocolError, httpx.ReadError):  # a dropped keep-alive connection, as in get()
                log.debug("slurm_rest: retrying GET %s after a dropped connection", path)
                response = self._transport.handle_request(self._build("GET", path, headers, params=params))
        except httpx.HTTPError as exc:
            raise self._transport_failure(during, exc) from exc
        try:
            if response.status_code >= 300:
                content = _read_capped(response, max_item_bytes, during)
                body = self._interpret(response.status_code, content, username=username, during=during,
                                       submitting=False)
                items = body.get(key)
                yield from items if isinstance(items, list) else []
                return
            reader = ItemStream(key, max_item_chars=max_item_bytes, during=during)
            text = codecs.getincrementaldecoder("utf-8")("replace")
            try:
                for chunk in response.iter_bytes():
                    yield from reader.feed(text.decode(chunk))
                yield from reader.feed(text.decode(b"", final=True))
            except httpx.HTTPError as exc:
                raise self._transport_failure(during, exc) from exc
            others = reader.finish()
        finally:
            response.close()
        found = slurm_errors.without_empty_results(slurm_errors.errors_in(others))
        if found:
            raise slurm_errors.to_exception(found, during=during, submitting=False, http_status=response.status_code)

    def _transport_failure(self, during: str, exc: httpx.HTTPError) -> AdapterError:
        """A read's failure to connect, or to be answered whole."""
        if isinstance(exc, _NOT_SENT):
            return self._connect_failure(during, exc)
        if isinstance(exc, _MAYBE_SENT):
            return ClusterUnreachable(f"slurmrestd {during}: {type(exc).__name__}: {exc}",
                                      code="command_timeout" if isinstance(exc, httpx.ReadTimeout) else None)
        return ClusterUnreachable(f"slurmrestd {during}: {exc}")

    def request(
        self,
        method: str,
        path: str,
        *,
        username: str,
        during: str,
        params: Params | None = None,
        body: JsonObject | None = None,
        submitting: bool = False,
        max_bytes: int | None = None,
    ) -> JsonObject:
        """One call; returns the JSON object body or raises an AdapterError."""
        headers = self._identity.headers(username)
        with self._calls_lock:
            self._calls += 1
        started = time.perf_counter()
        try:
            # streamed: the answer is read below up to max_bytes, then closed
            response = self._transport.handle_request(self._build(method, path, headers, params=params, body=body))
            try:
                content = _read_capped(response, max_bytes, during)
            finally:
                response.close()
        except httpx.HTTPError as exc:
            if submitting and isinstance(exc, _MAYBE_SENT):
                raise SubmitOutcomeUnknown(
                    f"slurmrestd {during}: no answer after sending ({type(exc).__name__}); the job may exist"
                ) from exc
            raise self._transport_failure(during, exc) from exc
        elapsed_ms = (time.perf_counter() - started) * 1000
        log.debug("slurm_rest %s %s -> %s in %.1f ms", method, path, response.status_code, elapsed_ms)
        return self._interpret(response.status_code, content, username=username, during=during,
                               submitting=submitting)

    def _interpret(self, status: int, content: bytes, *, username: str, during: str, submitting: bool) -> JsonObject:
        body = _json_body(content)
        found = slurm_errors.errors_in(body)
        if status < 400:  # "nothing found" in a 200 answer is an empty result (22.05)
            found = slurm_errors.without_empty_results(found)
        if status in (401, 403):
            self._identity.forget(username)
            if not found:
                raise AdapterConfigError(
                    f"slurmrestd {during}: HTTP {status}: credentials for {username!r} refused",
                    code="auth_failed",
                )
        if found:
            raise slurm_errors.to_exception(found, during=during, submitting=submitting, http_status=status)
        if status >= 400:
            raise _status_error(status, content, during=during, submitting=submitting)
        if body is None:
            raise AdapterError(
                f"slurmrestd {during}: HTTP {status} without a JSON object body",
                transient=True,
                code="bad_response",
            )
        return body


def _tls_error(exc: BaseException) -> str | None:
    """The SSL error behind a connection failure, if that is what it was."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _read_capped(response: httpx.Response, max_bytes: int | None, during: str) -> bytes:
    """The (decoded) body, or ``OutputTooLarge`` once it passes ``max_bytes``: a
    declared length is refused before reading, otherwise reading stops at the cap."""
    if max_bytes is None:
        return response.read()
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise OutputTooLarge(f"slurmrestd {during}: answer of {int(declared)} bytes exceeds {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise OutputTooLarge(f"slurmrestd {during}: answer exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_body(content: bytes) -> JsonObject | None:
    try:
        body = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _status_error(status: int, content: bytes, *, during: str, submitting: bool) -> AdapterError:
    snippet = content[:800].decode("utf-8", "replace")[:200].strip()
    message = f"slurmrestd {during}: HTTP {status}" + (f": {snippet}" if snippet else "")
    if status == 404:
        return AdapterError(message, code="endpoint_not_found")
    if status in (502, 503, 504):
        if submitting and status == 504:
            return SubmitOutcomeUnknown(message)
        return ClusterUnreachable(message)
    if status >= 500:
        if submitting:
            return SubmitOutcomeUnknown(message)
        return AdapterError(message, transient=True, code="cluster_error")
    if submitting:
        return SubmitRejected(message, code="submit_rejected")
    return AdapterError(message, code="bad_request")

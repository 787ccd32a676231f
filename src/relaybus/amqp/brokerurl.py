"""Broker URLs: the part pika reads, the part Twisted needs (TLS), both checked at start.

pika's `URLParameters` refuses query keys it does not know, and what it knows about TLS, TCP
and retries does nothing here: Twisted makes the connection (see the field notes). So the URL
is split: relaybus's own TLS options (`cafile`, `certfile`, `keyfile`, `server_hostname`,
named as in pika's `ssl_options`) are taken out and used to build Twisted's client TLS
options; the options pika applies on our adapter stay in for pika; anything else is a usage
error that names the option. No message here ever holds the URL's password or a file's bytes.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import urllib.parse
from typing import Any

import attrs
import pika
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)

MAX_URL_CHARS = 8192
MAX_QUERY_FIELDS = 16
MAX_PATH_CHARS = 4096
MAX_PEM_BYTES = 1024 * 1024  # a whole public CA bundle is about 200 KiB
MAX_HOSTNAME_CHARS = 253
MAX_HEARTBEAT_S = 65_535

TLS_OPTIONS = ("cafile", "certfile", "keyfile", "server_hostname")
# pika applies these itself on our adapter (connection.tune, connection.start, its timers).
PIKA_OPTIONS = ("heartbeat", "channel_max", "frame_max", "locale", "blocked_connection_timeout")
# pika knows these, but with Twisted making the connection they would silently do nothing.
INEFFECTIVE_OPTIONS = {
    "ssl_options": "Twisted does the TLS: use cafile, certfile, keyfile, server_hostname",
    "tcp_options": "Twisted makes the TCP connection",
    "connection_attempts": "relaybus reconnects by itself, with backoff",
    "retry_delay": "relaybus reconnects by itself, with backoff",
    "socket_timeout": "Twisted makes the TCP connection (10 s connect timeout)",
    "stack_timeout": "relaybus bounds the connection setup itself (15 s)",
    "client_properties": "relaybus names its connections itself",
}
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _shown(text: str, limit: int = 80) -> str:
    """A user-supplied name or path, quoted and cut short, for an error message."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


@attrs.frozen
class BrokerURL:
    """A checked broker URL. `pikaURL` (what pika parses: credentials, vhost and pika's own
    options) holds the password, so it stays out of the repr."""

    scheme: str
    host: str
    port: int
    pikaURL: str = attrs.field(repr=False)
    caFile: str | None = None
    certFile: str | None = None
    keyFile: str | None = None
    serverHostname: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    @property
    def verifyHostname(self) -> str:
        """The name the broker's certificate must carry (and the SNI, unless an address)."""
        return self.serverHostname or self.host


def parseBrokerURL(url: str) -> BrokerURL:
    """Split and check an amqp:// or amqps:// URL (files are not read here: `clientTLS`
    reads them). Raises ValueError with a message fit for a log."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"the broker URL is over {MAX_URL_CHARS} characters")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("amqp", "amqps"):
        raise ValueError("broker must be 'memory' or an amqp:// or amqps:// URL")
    if parsed.fragment or url.endswith("#"):
        raise ValueError("the broker URL has a '#' (in a password, write it as %23)")
    try:
        port = parsed.port
        host = parsed.hostname
    except ValueError:  # its message repeats the port text, which may be part of a password
        raise ValueError("the broker URL's port must be a number from 1 to 65535 (in a "
                         "password, write ':' as %3A, '@' as %40, '/' as %2F)") from None
    if not host:
        raise ValueError("the broker URL names no host")
    if port == 0:
        raise ValueError("the broker URL's port must be a number from 1 to 65535")
    if parsed.username is not None and parsed.password is None:
        raise ValueError("the broker URL names a user but no password (user:password@host)")
    if parsed.username is None and "@" in url.partition("://")[2]:
        # u:1234/rest@host parses as host u, port 1234: the rest of the password would be
        # the vhost (sent to host u) or a query value (repeated in pika's error)
        raise ValueError("the broker URL has an '@' after its host (in a password, write '/' "
                         "as %2F and '?' as %3F; elsewhere, '@' as %40)")
    options = _queryOptions(parsed.query)
    tls = {k: options.pop(k) for k in TLS_OPTIONS if k in options}
    if tls and parsed.scheme != "amqps":
        raise ValueError(f"broker URL option {sorted(tls)[0]} needs an amqps:// URL")
    for name in ("cafile", "certfile", "keyfile"):
        if name in tls:
            _checkPath(name, tls[name])
    if "keyfile" in tls and "certfile" not in tls:
        raise ValueError("broker URL option keyfile needs certfile (the client certificate)")
    hostname = tls.get("server_hostname")
    if hostname is not None and not _isHostname(hostname):
        raise ValueError(f"broker URL option server_hostname: {_shown(hostname)} is not a "
                         "host name or an IP address")
    pikaURL = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path,
                                       urllib.parse.urlencode(options), ""))
    return BrokerURL(parsed.scheme, host, port or (5671 if parsed.scheme == "amqps" else 5672),
                     pikaURL, tls.get("cafile"), tls.get("certfile"), tls.get("keyfile"),
                     hostname)


def _queryOptions(query: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True,
                                       max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise ValueError("the broker URL's query must be name=value pairs joined by '&', at "
                         f"most {MAX_QUERY_FIELDS}") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name in INEFFECTIVE_OPTIONS:
            raise ValueError(f"broker URL option {name} has no effect in relaybus: "
                             f"{INEFFECTIVE_OPTIONS[name]}")
        if name not in TLS_OPTIONS and name not in PIKA_OPTIONS:
            raise ValueError(f"unknown broker URL option {_shown(name, 40)} (known: "
                             f"{', '.join(TLS_OPTIONS + PIKA_OPTIONS)})")
        if name in options:
            raise ValueError(f"broker URL option {name} is given twice")
        if not value:
            raise ValueError(f"broker URL option {name} needs a value")
        options[name] = value
    return options


def _checkPath(option: str, path: str) -> None:
    if len(path) > MAX_PATH_CHARS:
        raise ValueError(f"broker URL option {option}: the path is over {MAX_PATH_CHARS} "
                         "characters")
    if "\0" in path:
        raise ValueError(f"broker URL option {option}: the path holds a NUL character")


def _isHostname(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return len(name) <= MAX_HOSTNAME_CHARS and _HOSTNAME.fullmatch(name) is not None


def pikaParameters(broker: BrokerURL) -> pika.URLParameters:
    """What pika makes of the URL (credentials, vhost, its own options); ValueError if it
    refuses a value (pika's message names the option and its value, never the URL)."""
    try:
        parameters = pika.URLParameters(broker.pikaURL)
    except (ValueError, TypeError, SyntaxError) as e:
        raise ValueError(f"broker URL: {e}") from None
    # pika takes both, then fails every connection at tune-ok (the heartbeat is an AMQP short)
    # or asserts in callLater once the broker blocks the connection.
    if parameters.heartbeat is not None and parameters.heartbeat > MAX_HEARTBEAT_S:
        raise ValueError(f"broker URL option heartbeat must be 0 to {MAX_HEARTBEAT_S} seconds")
    blockedTimeout = parameters.blocked_connection_timeout
    if blockedTimeout is not None and not math.isfinite(blockedTimeout):
        raise ValueError("broker URL option blocked_connection_timeout must be a finite number "
                         "of seconds")
    return parameters


def readPEM(option: str, path: str) -> bytes:
    """A small regular file's bytes (a FIFO or /dev/zero would block or never end)."""
    where = _shown(path, 200)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"broker URL option {option}: no such file {where}") from None
    except OSError as e:
        raise ValueError(f"broker URL option {option}: cannot read {where}: "
                         f"{e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"broker URL option {option}: {where} is not a regular file")
    if info.st_size > MAX_PEM_BYTES:
        raise ValueError(f"broker URL option {option}: {where} is over {MAX_PEM_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise ValueError(f"broker URL option {option}: cannot read {where}: "
                         f"{e.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ValueError(f"broker URL option {option}: {where} is over {MAX_PEM_BYTES} bytes")
    return data


def _certificates(option: str, path: str) -> list[x509.Certificate]:
    data = readPEM(option, path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:  # never repeat what the file holds
        certificates = []
    if not certificates:
        raise ValueError(f"broker URL option {option}: {_shown(path, 200)} holds no PEM "
                         "certificate")
    return certificates


def _privateKey(option: str, path: str) -> Any:
    data = readPEM(option, path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise ValueError(f"broker URL option {option}: the private key in {_shown(path, 200)} "
                         "is encrypted (relaybus reads unencrypted keys only: protect the "
                         "file with its permissions)") from None
    except (ValueError, UnsupportedAlgorithm):  # never repeat what the file holds
        raise ValueError(f"broker URL option {option}: {_shown(path, 200)} holds no PEM "
                         "private key relaybus can use") from None


def _der(certificate: x509.Certificate) -> Certificate:
    return Certificate.load(certificate.public_bytes(serialization.Encoding.DER),
                            crypto.FILETYPE_ASN1)


def clientTLS(broker: BrokerURL) -> IOpenSSLClientConnectionCreator:
    """Twisted's client TLS options for an amqps:// URL: the broker's certificate must chain
    to `cafile` (the system's trust store without it) and name `server_hostname` (or the
    URL's host); `certfile` (+ `keyfile`, or the key in `certfile`) is presented when set.
    Reads the files now: ValueError names the option and the file, never the bytes."""
    trustRoot = None
    if broker.caFile is not None:
        trustRoot = trustRootFromCertificates(
            [_der(c) for c in _certificates("cafile", broker.caFile)])
    clientCertificate = None
    extra: dict[str, Any] = {}
    if broker.certFile is not None:
        chain = _certificates("certfile", broker.certFile)
        keyOption = "keyfile" if broker.keyFile is not None else "certfile"
        key = _privateKey(keyOption, broker.keyFile or broker.certFile)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
            raise ValueError("broker URL options certfile and keyfile: the private key does "
                             "not belong to the (first) certificate")
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        clientCertificate = PrivateCertificate.fromCertificateAndKeyPair(
            _der(chain[0]), KeyPair.load(pem, crypto.FILETYPE_PEM))
        if len(chain) > 1:  # intermediates the broker may need to verify us
            extra["extraCertChain"] = [_der(c).original for c in chain[1:]]
    return optionsForClientTLS(broker.verifyHostname, trustRoot, clientCertificate,
                               extraCertificateOptions=extra or None)

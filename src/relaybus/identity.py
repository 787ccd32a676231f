"""Who a client is: a bearer JWT checked by PyJWT behind twisted.cred's seam.

The gateway hands the token a handshake carries (relaybus.admission finds it) to a twisted.cred
`Portal`; `JWTChecker` verifies it with PyJWT and the realm turns the verified claims into a
`Principal`, the avatar the connection keeps. No JWT parsing or crypto of our own: signature,
algorithm, `aud`, `iss` and required claims are PyJWT's. Only the time claims (`exp`, `nbf`)
are checked here, against the gateway's injected clock, because PyJWT reads the wall clock.

Every refusal is an `UnauthorizedLogin` whose message is one of a few short, fixed reasons:
it becomes the HTTP status text of the 401 and a log line, so it never carries the token, the
key or text PyJWT copied from the input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import jwt
import jwt.exceptions
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from twisted.cred.checkers import ANONYMOUS, AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from relaybus.jwks import DEFAULT_REFRESH_S, MAX_REFRESH_S, MIN_REFRESH_S, checkJWKSURL
from relaybus.strictjson import decodeJSON

MAX_TOKEN_BYTES = 8192
MAX_JWKS_KEYS = 100
MAX_SUB_LENGTH = 256
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
HMAC_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",)}
EDDSA_ALGORITHMS = ("EdDSA",)
KNOWN_ALGORITHMS = frozenset(
    (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, "ES256", "ES384", *EDDSA_ALGORITHMS))
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# The private members of RSA, EC and OKP JWKs (RFC 7518 6.2.2, 6.3.2; RFC 8037 2).
_PRIVATE_JWK_MEMBERS = frozenset(("d", "p", "q", "dp", "dq", "qi", "oth"))


class IBearerToken(ICredentials):
    token = Attribute("the raw token string, as the client sent it")


@implementer(IBearerToken)
@attrs.frozen
class BearerToken:
    token: str = attrs.field(repr=False)


class IPrincipal(Interface):
    """The avatar of a connection: who its token proved it is."""

    sub = Attribute("the verified subject")
    claims = Attribute("the verified claims (empty for anonymous)")
    expiresAt = Attribute("the token's exp in seconds since the epoch, or None")


@implementer(IPrincipal)
@attrs.frozen
class Principal:
    sub: str
    claims: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    expiresAt: float | None = None

    def forHello(self) -> dict[str, Any]:
        """As the hello frame shows it: expiresAt in milliseconds (no leeway added)."""
        expiresAt = None if self.expiresAt is None else int(self.expiresAt * 1000)
        return {"sub": self.sub, "expiresAt": expiresAt}


ANONYMOUS_PRINCIPAL = Principal("anonymous")


@attrs.frozen
class JWTSettings:
    secretFile: str | None = None
    publicKeyFile: str | None = None
    jwksFile: str | None = None
    jwksUrl: str | None = None
    jwksRefreshS: float = DEFAULT_REFRESH_S
    algorithms: tuple[str, ...] = ()  # the allow-list; () = from the key type
    audience: str | None = None
    issuer: str | None = None
    leewayS: float = 30.0

    @property
    def configured(self) -> bool:
        return any((self.secretFile, self.publicKeyFile, self.jwksFile, self.jwksUrl))


@attrs.frozen
class _Key:
    """One verification key and the algorithms it may verify."""

    material: Any = attrs.field(repr=False)  # HMAC secret bytes or a cryptography public key
    algorithms: tuple[str, ...]


class TimeSource(Protocol):
    """What the checker needs of a clock (a reactor, a twisted Clock)."""

    def seconds(self) -> float: ...


def _refuse(reason: str) -> UnauthorizedLogin:
    return UnauthorizedLogin(reason)


class UnknownKeyId(UnauthorizedLogin):
    """The token names a key id the key set does not hold."""


class KeysUnavailable(UnauthorizedLogin):
    """No key set is loaded yet (--jwks-url before its first fetch): the gateway's fault,
    not the client's, so the handshake gets HTTP 503, not 401."""


@implementer(ICredentialsChecker)
class JWTChecker:
    """Verifies bearer JWTs against one static key or a key set chosen by `kid`."""

    credentialInterfaces = (IBearerToken,)

    def __init__(self, keys: Mapping[str | None, _Key], settings: JWTSettings,
                 clock: TimeSource) -> None:
        self._keys = dict(keys)
        self._settings = settings
        self._clock = clock
        # Set by a remote key set (relaybus.jwks.RemoteJWKS): called when a token names an
        # unknown kid; a Deferred that fires when a refetch has ended, or None (no refetch).
        self.onUnknownKey: Callable[[], Deferred[None] | None] | None = None

    @property
    def keyIds(self) -> frozenset[str | None]:
        return frozenset(self._keys)

    def replaceKeys(self, jwksText: str, option: str = "--jwks-file") -> None:
        """A fresh key set (key rotation); refused whole (ValueError, the old keys stay)
        when it does not load."""
        self._keys = _keysFromJWKS(jwksText, self._settings.algorithms, option)

    # twisted.cred types avatar ids as bytes; ours is the Principal, so the realm gets the
    # verified claims without a second look at the token.
    def requestAvatarId(  # type: ignore[override]
            self, credentials: IBearerToken) -> Deferred[Principal]:
        """As verify; a token with an unknown kid waits for the refetch it causes (when one
        may run) and is verified once more against the fresh set."""
        token = credentials.token
        d = maybeDeferred(self.verify, token)
        if self.onUnknownKey is None:
            return d

        def unknownKey(failure: Failure) -> Any:
            failure.trap(UnknownKeyId, KeysUnavailable)
            assert self.onUnknownKey is not None
            refetched = self.onUnknownKey()
            if refetched is None:
                return failure
            return refetched.addCallback(lambda _: self.verify(token))

        return d.addErrback(unknownKey)

    def verify(self, token: str) -> Principal:
        if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            raise _refuse("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _refuse("malformed token") from None
        key = self._keyFor(header)
        if header.get("alg") not in key.algorithms:
            raise _refuse("algorithm not allowed")
        settings = self._settings
        try:
            claims = jwt.decode(
                token, key.material, algorithms=list(key.algorithms),
                audience=settings.audience, issuer=settings.issuer,
                options={"require": ["exp", "sub"], "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False,
                         "verify_aud": settings.audience is not None,
                         "verify_iss": settings.issuer is not None})
        except jwt.InvalidSignatureError:
            raise _refuse("bad signature") from None
        except jwt.InvalidAudienceError:
            raise _refuse("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _refuse("wrong issuer") from None
        except jwt.MissingRequiredClaimError as e:  # exp, sub; aud and iss when checked
            claim = e.claim if e.claim in ("sub", "exp", "aud", "iss") else "exp"
            raise _refuse(f"missing claim: {claim}") from None
        except jwt.InvalidAlgorithmError:
            raise _refuse("algorithm not allowed") from None
        except jwt.exceptions.InvalidSubjectError:
            raise _refuse("malformed claim: sub") from None
        except jwt.InvalidTokenError:
            raise _refuse("malformed token") from None
        return Principal(_subject(claims), claims, self._checkTimes(claims))

    def _keyFor(self, header: Mapping[str, Any]) -> _Key:
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _refuse("malformed token")
        if None in self._keys:  # one static key: a kid, if any, is not needed
            return self._keys[None]
        if not self._keys:
            raise KeysUnavailable("signing keys not loaded yet")
        if kid is None:
            if len(self._keys) == 1:
                return next(iter(self._keys.values()))
            raise _refuse("unknown key id")
        key = self._keys.get(kid)
        if key is None:
            raise UnknownKeyId("unknown key id")
        return key

    def _checkTimes(self, claims: Mapping[str, Any]) -> float:
        now, leeway = self._clock.seconds(), self._settings.leewayS
        expiresAt = _numericDate(claims, "exp")
        if expiresAt is None or now > expiresAt + leeway:
            raise _refuse("token expired")
        if "nbf" in claims:
            notBefore = _numericDate(claims, "nbf")
            if notBefore is None or now + leeway < notBefore:
                raise _refuse("token not yet valid")
        return expiresAt


MAX_NUMERIC_DATE = 253_402_300_799  # 9999-12-31T23:59:59Z: beyond it, a date is nonsense


def _numericDate(claims: Mapping[str, Any], name: str) -> float | None:
    """A JSON number of seconds: not a bool, and finite (PyJWT's JSON takes NaN and
    Infinity) and within year 9999, so that expiresAt in milliseconds stays an integer."""
    value = claims.get(name)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or abs(value) > MAX_NUMERIC_DATE):
        raise _refuse(f"malformed claim: {name}")
    return float(value)


def _subject(claims: Mapping[str, Any]) -> str:
    sub = claims.get("sub")
    if (not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUB_LENGTH
            or _CONTROL_CHARACTERS.search(sub)):
        raise _refuse("malformed claim: sub")
    return sub


@implementer(IRealm)
class PrincipalRealm:
    """The verified claims (the checker's avatarId) become the connection's Principal."""

    def requestAvatar(self, avatarId: Any, mind: object,
                      *interfaces: Any) -> tuple[Any, Principal, Any]:
        if IPrincipal not in interfaces:
            raise NotImplementedError("relaybus avatars are principals")
        principal = ANONYMOUS_PRINCIPAL if avatarId is ANONYMOUS else avatarId
        return IPrincipal, principal, lambda: None


def makePortal(checker: JWTChecker, allowAnonymous: bool) -> Portal:
    checkers: list[ICredentialsChecker] = [checker]
    if allowAnonymous:
        checkers.append(AllowAnonymousAccess())
    return Portal(PrincipalRealm(), checkers)


# Loading the key material, once at start: every mistake is a clear error then, never a
# surprise at the first handshake.


def loadChecker(settings: JWTSettings, clock: TimeSource) -> JWTChecker:
    sources = [name for name, value in (("--jwt-secret-file", settings.secretFile),
                                        ("--jwt-public-key-file", settings.publicKeyFile),
                                        ("--jwks-file", settings.jwksFile),
                                        ("--jwks-url", settings.jwksUrl)) if value]
    if len(sources) != 1:
        raise ValueError("name exactly one JWT key source (--jwt-secret-file, "
                         "--jwt-public-key-file, --jwks-file or --jwks-url)")
    if not MIN_REFRESH_S <= settings.jwksRefreshS <= MAX_REFRESH_S:
        raise ValueError(f"--jwks-refresh must be {MIN_REFRESH_S:g} to {MAX_REFRESH_S:g} "
                         "seconds")
    if settings.leewayS < 0:
        raise ValueError("--jwt-leeway must not be negative")
    _checkAllowList(settings.algorithms)
    keys: dict[str | None, _Key]
    if settings.secretFile:
        keys = {None: _hmacKey(_read(settings.secretFile, "--jwt-secret-file"),
                               settings.algorithms)}
    elif settings.publicKeyFile:
        pem = _read(settings.publicKeyFile, "--jwt-public-key-file")
        try:
            publicKey = load_pem_public_key(pem)
        except (ValueError, TypeError):
            raise ValueError("--jwt-public-key-file must hold a PEM public key (a private "
                             "key, a certificate or anything else is refused)") from None
        keys = {None: _Key(publicKey, _allowed(_family(publicKey), settings.algorithms,
                                               "--jwt-public-key-file"))}
    elif settings.jwksFile:
        text = _read(settings.jwksFile, "--jwks-file").decode("utf-8", "replace")
        keys = _keysFromJWKS(text, settings.algorithms)
    else:
        assert settings.jwksUrl is not None
        checkJWKSURL(settings.jwksUrl)
        keys = {}  # fetched once the gateway runs (relaybus.jwks.RemoteJWKS)
    return JWTChecker(keys, settings, clock)


def _read(path: str, option: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{option}: cannot read {path}: {e.strerror}") from None
    if not data.strip():
        raise ValueError(f"{option}: {path} is empty")
    return data


def _checkAllowList(algorithms: Sequence[str]) -> None:
    for name in algorithms:
        if name.lower() == "none":
            raise ValueError("--jwt-algorithms: 'none' is never accepted")
        if name not in KNOWN_ALGORITHMS:
            raise ValueError(f"--jwt-algorithms: unknown algorithm {name[:20]!r} (known: "
                             f"{', '.join(sorted(KNOWN_ALGORITHMS))})")
    hmac = {name in HMAC_ALGORITHMS for name in algorithms}
    if len(hmac) > 1:
        raise ValueError("--jwt-algorithms must not mix HMAC (HS*) and public-key algorithms")


def _hmacKey(secret: bytes, algorithms: Sequence[str]) -> _Key:
    """RFC 7518 3.2: a key at least as long as the hash. Without --jwt-algorithms, the
    algorithms are those the secret is long enough for."""
    secret = secret.rstrip(b"\r\n")
    if len(secret) < HMAC_MIN_SECRET_BYTES["HS256"]:
        raise ValueError(f"--jwt-secret-file: the secret must be at least "
                         f"{HMAC_MIN_SECRET_BYTES['HS256']} bytes")
    longEnough = tuple(name for name in HMAC_ALGORITHMS
                       if len(secret) >= HMAC_MIN_SECRET_BYTES[name])
    for name in algorithms:
        if name in HMAC_ALGORITHMS and name not in longEnough:
            raise ValueError(f"--jwt-secret-file: {name} needs a secret of at least "
                             f"{HMAC_MIN_SECRET_BYTES[name]} bytes")
    return _Key(secret, _allowed(longEnough, algorithms, "--jwt-secret-file"))


def _family(publicKey: Any) -> tuple[str, ...]:
    if isinstance(publicKey, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(publicKey, ec.EllipticCurvePublicKey):
        if publicKey.curve.name not in EC_ALGORITHMS:
            raise ValueError(f"unsupported elliptic curve {publicKey.curve.name}")
        return EC_ALGORITHMS[publicKey.curve.name]
    if isinstance(publicKey, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return EDDSA_ALGORITHMS
    raise ValueError("unsupported public key type (RSA, EC P-256/P-384 or Ed25519/Ed448)")


def _allowed(family: Sequence[str], algorithms: Sequence[str], option: str) -> tuple[str, ...]:
    """The algorithms a key may verify: its family, narrowed by --jwt-algorithms."""
    if not algorithms:
        return tuple(family)
    allowed = tuple(name for name in algorithms if name in family)
    if not allowed:
        raise ValueError(f"--jwt-algorithms allows none of the algorithms the key of "
                         f"{option} can verify ({', '.join(family)})")
    return allowed


def _keysFromJWKS(text: str, algorithms: Sequence[str],
                  option: str = "--jwks-file") -> dict[str | None, _Key]:
    """Public keys only: a symmetric (oct) key in a JWK Set is refused, so an HMAC
    algorithm can never meet a key that was published, and so is a private key. Keys whose
    `use` is not `sig` (encryption keys) are left out; at most MAX_JWKS_KEYS keys. Every
    message is fixed: it is logged, and must not show key material."""
    try:
        document = decodeJSON(text)
    except ValueError:
        raise ValueError(f"{option}: not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{option}: not a JWK Set (an object with a list of keys)")
    if len(entries) > MAX_JWKS_KEYS:
        raise ValueError(f"{option}: more than {MAX_JWKS_KEYS} keys")
    # Before PyJWT sees them: from an RSA `d` without the primes it searches for the factors,
    # seconds to minutes of the reactor's time for a set of 1 KiB.
    if any(isinstance(entry, dict) and not _PRIVATE_JWK_MEMBERS.isdisjoint(entry)
           for entry in entries):
        raise ValueError(f"{option}: private key material is refused; publish public keys only")
    entries = [entry for entry in entries
               if not (isinstance(entry, dict) and entry.get("use", "sig") != "sig")]
    try:
        keySet = jwt.PyJWKSet(entries)
    except (jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError, KeyError, TypeError,
            NotImplementedError):  # a JWK with alg "none", an oct key without "k"
        raise ValueError(f"{option}: not a JWK Set with usable keys") from None
    keys: dict[str | None, _Key] = {}
    for jwk in keySet.keys:
        if jwk.key_type == "oct":
            raise ValueError(f"{option}: symmetric (oct) keys are refused; publish public "
                             "keys only")
        if jwk.key_id is not None and not isinstance(jwk.key_id, str):
            raise ValueError(f"{option}: a kid must be a string")
        if jwk.key_id is None and len(keySet.keys) > 1:
            raise ValueError(f"{option}: with several keys, every key needs a kid")
        if jwk.key_id in keys:
            raise ValueError(f"{option}: two keys share a kid")
        keys[jwk.key_id if len(keySet.keys) > 1 else jwk.key_id or "default"] = _Key(
            jwk.key, _allowed(_family(jwk.key), algorithms, option))
    return keys

"""Bearer JWTs, verified by PyJWT behind twisted.cred, against hostile tokens: every refusal
is one short fixed reason that carries neither the token nor the key. On a Clock."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.cred.credentials import Anonymous
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.task import Clock
from unitsupport import failureResultOf, successResultOf

from relaybus.identity import (
    ANONYMOUS_PRINCIPAL,
    MAX_TOKEN_BYTES,
    BearerToken,
    IPrincipal,
    JWTChecker,
    JWTSettings,
    Principal,
    loadChecker,
    makePortal,
)

NOW = 1_764_000_000
SECRET = b"s" * 40
REASONS = {"token too large", "malformed token", "algorithm not allowed", "bad signature",
           "wrong audience", "wrong issuer", "missing claim: sub", "missing claim: exp",
           "missing claim: aud", "missing claim: iss",
           "token expired", "token not yet valid", "unknown key id", "malformed claim: sub",
           "malformed claim: exp", "malformed claim: nbf"}


@pytest.fixture(scope="module")
def rsaKey() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(publicKey: Any) -> bytes:
    return publicKey.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)


def write(tmp: Path, name: str, data: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": NOW + 600, "roles": ["user"], **extra}


def clockAt(t: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


def hmacChecker(tmp: Path, **settings: Any) -> JWTChecker:
    return loadChecker(JWTSettings(secretFile=write(tmp, "secret", SECRET), **settings),
                       clockAt())


def refusal(checker: JWTChecker, token: str) -> str:
    with pytest.raises(UnauthorizedLogin) as caught:
        checker.verify(token)
    reason = str(caught.value)
    assert reason in REASONS, reason
    assert (not token or token not in reason) and SECRET.decode() not in reason
    return reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


# The HMAC secret


def test_a_valid_token_proves_its_principal(tmp_path: Path) -> None:
    principal = hmacChecker(tmp_path).verify(jwt.encode(claims(), SECRET, "HS256"))
    assert principal == Principal("alice", claims(), float(NOW + 600))
    assert principal.forHello() == {"sub": "alice", "expiresAt": (NOW + 600) * 1000}
    assert IPrincipal.providedBy(principal)


@pytest.mark.parametrize(("payload", "reason"), [
    ({"exp": NOW + 600}, "missing claim: sub"),
    ({"sub": "alice"}, "missing claim: exp"),
    (claims(sub=""), "malformed claim: sub"),
    (claims(sub="a" * 257), "malformed claim: sub"),
    (claims(sub="alice\nroot"), "malformed claim: sub"),
    (claims(sub=7), "malformed claim: sub"),
    (claims(exp="tomorrow"), "malformed claim: exp"),
    (claims(exp=True), "malformed claim: exp"),
    (claims(nbf="now"), "malformed claim: nbf"),
    (claims(exp=float("nan")), "malformed claim: exp"),
    (claims(exp=float("inf")), "malformed claim: exp"),
    (claims(exp=1e308), "malformed claim: exp"),
    (claims(nbf=float("-inf")), "malformed claim: nbf"),
    (claims(exp=NOW - 31), "token expired"),
    (claims(nbf=NOW + 31), "token not yet valid"),
], ids=["no-sub", "no-exp", "empty-sub", "long-sub", "control-sub", "number-sub",
        "string-exp", "bool-exp", "string-nbf", "nan-exp", "infinite-exp", "huge-exp",
        "minus-infinite-nbf", "expired", "not-yet-valid"])
def test_claims_that_are_refused(tmp_path: Path, payload: dict[str, Any], reason: str) -> None:
    assert refusal(hmacChecker(tmp_path), jwt.encode(payload, SECRET, "HS256")) == reason


def test_the_leeway_covers_small_clock_skew(tmp_path: Path) -> None:
    checker = hmacChecker(tmp_path)
    assert checker.verify(jwt.encode(claims(exp=NOW - 29, nbf=NOW + 29), SECRET, "HS256"))
    strict = hmacChecker(tmp_path, leewayS=0)
    assert refusal(strict, jwt.encode(claims(exp=NOW - 1), SECRET, "HS256")) == "token expired"


def test_audience_and_issuer_are_checked_when_configured(tmp_path: Path) -> None:
    checker = hmacChecker(tmp_path, audience="relaybus", issuer="https://idp.example")
    good = claims(aud="relaybus", iss="https://idp.example")
    assert checker.verify(jwt.encode(good, SECRET, "HS256")).sub == "alice"
    assert refusal(checker, jwt.encode({**good, "aud": "other"}, SECRET, "HS256")) == \
        "wrong audience"
    assert refusal(checker, jwt.encode({**good, "iss": "https://evil"}, SECRET, "HS256")) == \
        "wrong issuer"
    # Not "missing claim: exp" (PyJWT names the claim that is missing).
    assert refusal(checker, jwt.encode(claims(aud="relaybus"), SECRET, "HS256")) == \
        "missing claim: iss"
    assert refusal(checker, jwt.encode(claims(iss="https://idp.example"), SECRET, "HS256")) == \
        "missing claim: aud"
    unchecked = hmacChecker(tmp_path)  # not configured: not checked
    assert unchecked.verify(jwt.encode({**good, "aud": "any"}, SECRET, "HS256"))


@pytest.mark.parametrize("token", [
    "", "a.b", "a.b.c.d", "!!!.@@@.###", b64(b'["not an object"]') + ".e30.", "x" * 10_000,
    jwt.api_jws.encode(b"not json", SECRET, "HS256"),  # correctly signed, payload not JSON
], ids=["empty", "two-parts", "four-parts", "bad-base64", "header-array", "10k-garbage",
        "payload-not-json"])
def test_malformed_tokens(tmp_path: Path, token: str) -> None:
    assert refusal(hmacChecker(tmp_path), token) in ("malformed token", "token too large")


def test_a_bad_signature(tmp_path: Path) -> None:
    token = jwt.encode(claims(), b"another secret of enough length!!", "HS256")
    assert refusal(hmacChecker(tmp_path), token) == "bad signature"


def test_alg_none_is_never_accepted(tmp_path: Path) -> None:
    token = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps(claims()).encode()) + "."
    assert refusal(hmacChecker(tmp_path), token) == "algorithm not allowed"


def test_a_token_over_the_size_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    token = jwt.encode(claims(padding="x" * MAX_TOKEN_BYTES), SECRET, "HS256")
    assert refusal(hmacChecker(tmp_path), token) == "token too large"


def test_the_allow_list_narrows_the_hmac_family(tmp_path: Path) -> None:
    long = b"L" * 64
    path = write(tmp_path, "long", long)
    checker = loadChecker(JWTSettings(secretFile=path, algorithms=("HS512",)), clockAt())
    assert checker.verify(jwt.encode(claims(), long, "HS512")).sub == "alice"
    assert refusal(checker, jwt.encode(claims(), long, "HS256")) == "algorithm not allowed"


def test_without_an_allow_list_a_secret_verifies_what_it_is_long_enough_for(
        tmp_path: Path) -> None:
    checker = hmacChecker(tmp_path)  # 40 bytes: HS256 only
    assert refusal(checker, jwt.encode(claims(), b"L" * 48, "HS384")) == "algorithm not allowed"


# A public key: algorithm confusion


def test_rs256_with_a_public_key(tmp_path: Path, rsaKey: rsa.RSAPrivateKey) -> None:
    checker = loadChecker(JWTSettings(publicKeyFile=write(tmp_path, "k.pem",
                                                          pem(rsaKey.public_key()))), clockAt())
    assert checker.verify(jwt.encode(claims(), rsaKey, "RS256")).sub == "alice"
    assert checker.verify(jwt.encode(claims(), rsaKey, "PS256")).sub == "alice"


def test_hs256_signed_with_the_public_key_as_secret_is_refused(
        tmp_path: Path, rsaKey: rsa.RSAPrivateKey) -> None:
    publicPem = pem(rsaKey.public_key())
    checker = loadChecker(JWTSettings(publicKeyFile=write(tmp_path, "k.pem", publicPem)),
                          clockAt())
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    payload = b64(json.dumps(claims()).encode())
    import hashlib
    import hmac

    signature = b64(hmac.new(publicPem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert refusal(checker, f"{header}.{payload}.{signature}") == "algorithm not allowed"


def test_an_rs256_token_against_an_hmac_checker_is_refused(
        tmp_path: Path, rsaKey: rsa.RSAPrivateKey) -> None:
    assert refusal(hmacChecker(tmp_path), jwt.encode(claims(), rsaKey, "RS256")) == \
        "algorithm not allowed"


@pytest.mark.parametrize("kind", ["ec-p256", "ed25519"])
def test_ec_and_eddsa_public_keys(tmp_path: Path, kind: str) -> None:
    private: Any = (ec.generate_private_key(ec.SECP256R1()) if kind == "ec-p256"
                    else ed25519.Ed25519PrivateKey.generate())
    algorithm = "ES256" if kind == "ec-p256" else "EdDSA"
    checker = loadChecker(JWTSettings(publicKeyFile=write(tmp_path, "k.pem",
                                                          pem(private.public_key()))), clockAt())
    assert checker.verify(jwt.encode(claims(), private, algorithm)).sub == "alice"


# A JWK Set: keys by kid


def jwks(*keys: tuple[str | None, Any]) -> str:
    entries = []
    for kid, private in keys:
        entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
        if kid is not None:
            entry["kid"] = kid
        entries.append(entry)
    return json.dumps({"keys": entries})


def test_a_jwks_picks_the_key_by_kid(tmp_path: Path, rsaKey: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    checker = loadChecker(JWTSettings(jwksFile=write(tmp_path, "jwks.json",
                                                     jwks(("k1", rsaKey), ("k2", other)))),
                          clockAt())
    assert checker.verify(jwt.encode(claims(), other, "RS256", headers={"kid": "k2"}))
    assert refusal(checker, jwt.encode(claims(), other, "RS256", headers={"kid": "k1"})) == \
        "bad signature"
    assert refusal(checker, jwt.encode(claims(), other, "RS256", headers={"kid": "k9"})) == \
        "unknown key id"
    assert refusal(checker, jwt.encode(claims(), other, "RS256")) == "unknown key id"


def test_keys_can_be_replaced_at_run_time(tmp_path: Path, rsaKey: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    checker = loadChecker(JWTSettings(jwksFile=write(tmp_path, "jwks.json",
                                                     jwks(("k1", rsaKey)))), clockAt())
    token = jwt.encode(claims(), other, "RS256", headers={"kid": "k2"})
    assert refusal(checker, token) == "unknown key id"
    checker.replaceKeys(jwks(("k1", rsaKey), ("k2", other)))
    assert checker.verify(token).sub == "alice"


# twisted.cred


def test_the_portal_logs_a_bearer_token_in_as_its_principal(tmp_path: Path) -> None:
    portal = makePortal(hmacChecker(tmp_path), allowAnonymous=False)
    interface, principal, _logout = successResultOf(portal.login(
        BearerToken(jwt.encode(claims(), SECRET, "HS256")), None, IPrincipal))
    assert interface is IPrincipal and principal.sub == "alice"
    failed = failureResultOf(portal.login(BearerToken("junk"), None, IPrincipal),
                             UnauthorizedLogin)
    assert str(failed.value) == "malformed token"
    failureResultOf(portal.login(Anonymous(), None, IPrincipal), UnhandledCredentials)


def test_anonymous_only_when_allowed(tmp_path: Path) -> None:
    portal = makePortal(hmacChecker(tmp_path), allowAnonymous=True)
    _interface, principal, _logout = successResultOf(portal.login(Anonymous(), None,
                                                                  IPrincipal))
    assert principal is ANONYMOUS_PRINCIPAL
    assert principal.forHello() == {"sub": "anonymous", "expiresAt": None}


def test_the_token_never_shows_in_a_repr() -> None:
    assert "secret-token" not in repr(BearerToken("secret-token"))


# Refusals at start: a usage error, never a surprise at the first handshake


def test_start_time_refusals(tmp_path: Path, rsaKey: rsa.RSAPrivateKey) -> None:
    secret = write(tmp_path, "secret", SECRET)
    public = write(tmp_path, "public.pem", pem(rsaKey.public_key()))
    private = write(tmp_path, "private.pem", rsaKey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cases = {
        "no source": JWTSettings(),
        "two sources": JWTSettings(secretFile=secret, publicKeyFile=public),
        "missing file": JWTSettings(secretFile=str(tmp_path / "nope")),
        "empty file": JWTSettings(secretFile=write(tmp_path, "empty", b"\n")),
        "short secret": JWTSettings(secretFile=write(tmp_path, "short", b"tooshort")),
        "secret too short for HS512": JWTSettings(secretFile=secret, algorithms=("HS512",)),
        "private key as public key": JWTSettings(publicKeyFile=private),
        "none": JWTSettings(secretFile=secret, algorithms=("none",)),
        "unknown algorithm": JWTSettings(secretFile=secret, algorithms=("HS999",)),
        "mixed families": JWTSettings(secretFile=secret, algorithms=("HS256", "RS256")),
        "hmac with a public key": JWTSettings(publicKeyFile=public, algorithms=("HS256",)),
        "rsa with a secret": JWTSettings(secretFile=secret, algorithms=("RS256",)),
        "negative leeway": JWTSettings(secretFile=secret, leewayS=-1),
        "oct key in a jwks": JWTSettings(jwksFile=write(tmp_path, "oct.json", json.dumps(
            {"keys": [{"kty": "oct", "k": b64(SECRET), "kid": "s"}]}))),
        "jwks without kids": JWTSettings(jwksFile=write(
            tmp_path, "nokid.json", jwks((None, rsaKey), (None, rsaKey)))),
        "not a jwks": JWTSettings(jwksFile=write(tmp_path, "bad.json", "{]")),
        "alg none in a jwks": JWTSettings(jwksFile=write(tmp_path, "none.json", json.dumps(
            {"keys": [{"kty": "RSA", "alg": "none", "n": "AQAB", "e": "AQAB"}]}))),
        "oct key without k": JWTSettings(jwksFile=write(tmp_path, "nok.json", json.dumps(
            {"keys": [{"kty": "oct"}]}))),
    }
    for what, settings in cases.items():
        with pytest.raises(ValueError) as caught:
            loadChecker(settings, clockAt())
        message = str(caught.value)
        assert SECRET.decode() not in message and "PRIVATE" not in message, (what, message)

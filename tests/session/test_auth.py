"""Token checks with real keys generated here and fake times."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from portao.config import Settings
from portao.errors import ConfigError
from portao.session.auth import (
    MAX_ROOM_PATTERNS,
    Algorithm,
    AuthFailure,
    Claims,
    TokenVerifier,
    generate_secret,
    mint_token,
)

NOW = 1_800_000_000.0
SECRET = "s" * 32


@dataclass(frozen=True)
class KeyPair:
    private: str
    public: str


def _pem_pair(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> KeyPair:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return KeyPair(private, public)


def _rsa_pair(key_size: int = 2048) -> KeyPair:
    return _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=key_size))


def _ec_pair() -> KeyPair:
    return _pem_pair(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[KeyPair, KeyPair]:
    """Two RSA pairs: the right one and another."""
    return _rsa_pair(), _rsa_pair()


@pytest.fixture(scope="module")
def ec_keys() -> tuple[KeyPair, KeyPair]:
    return _ec_pair(), _ec_pair()


@pytest.fixture(scope="module")
def keys(
    rsa_keys: tuple[KeyPair, KeyPair], ec_keys: tuple[KeyPair, KeyPair]
) -> dict[str, tuple[KeyPair, KeyPair]]:
    """Per algorithm: (signing and verifying pair, another pair)."""
    return {
        "HS256": (KeyPair(SECRET, SECRET), KeyPair("o" * 32, "o" * 32)),
        "RS256": rsa_keys,
        "ES256": ec_keys,
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    """A token signed by hand: PyJWT refuses to sign some of what these tests need."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    mac = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def _verify(payload: dict[str, Any], now: float = NOW) -> Claims | AuthFailure:
    return TokenVerifier("HS256", SECRET).verify(_hs256(payload), now)


def _failure(result: Claims | AuthFailure, token: str | None = None) -> str:
    assert isinstance(result, AuthFailure), result
    if token:
        assert token not in result.message
    return result.message


# -- signatures and algorithms -----------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256"])
def test_valid_token_gives_claims(
    algorithm: Algorithm, keys: dict[str, tuple[KeyPair, KeyPair]]
) -> None:
    pair = keys[algorithm][0]
    token = mint_token(pair.private, "alice", rooms=["chat.*"], algorithm=algorithm, now=NOW)
    claims = TokenVerifier(algorithm, pair.public).verify(token, NOW + 10)
    assert claims == Claims(sub="alice", exp=NOW + 3600, rooms=("chat.*",))
    assert isinstance(claims, Claims)
    assert claims.may_join("chat.lobby")


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256"])
def test_wrong_key_is_refused(
    algorithm: Algorithm, keys: dict[str, tuple[KeyPair, KeyPair]]
) -> None:
    right, other = keys[algorithm]
    token = mint_token(other.private, "alice", algorithm=algorithm, now=NOW)
    result = TokenVerifier(algorithm, right.public).verify(token, NOW)
    assert _failure(result, token) == "invalid token"


@pytest.mark.parametrize(
    ("signed", "verifier"),
    [("HS256", "RS256"), ("RS256", "HS256"), ("ES256", "RS256"), ("RS256", "ES256")],
)
def test_only_the_configured_algorithm_is_accepted(
    signed: Algorithm, verifier: Algorithm, keys: dict[str, tuple[KeyPair, KeyPair]]
) -> None:
    token = mint_token(keys[signed][0].private, "alice", algorithm=signed, now=NOW)
    result = TokenVerifier(verifier, keys[verifier][0].public).verify(token, NOW)
    assert _failure(result, token) == "invalid token"


def test_hmac_signed_with_the_public_key_is_refused(
    rsa_keys: tuple[KeyPair, KeyPair],
) -> None:
    """The classic confusion: HS256 keyed with the RS256 verifier's public PEM."""
    public = rsa_keys[0].public
    token = _hs256({"sub": "mallory"}, secret=public)
    assert _failure(TokenVerifier("RS256", public).verify(token, NOW)) == "invalid token"


def test_alg_none_is_refused() -> None:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"sub": "mallory"}).encode())
    token = f"{head}.{body}."
    assert _failure(TokenVerifier("HS256", SECRET).verify(token, NOW)) == "invalid token"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "a.b", "..", "☃.☃.☃", "e30.e30.e30", "x" * 5000, "a.b.c.d.e"],
)
def test_garbage_is_refused(token: str) -> None:
    assert _failure(TokenVerifier("HS256", SECRET).verify(token, NOW)) == "invalid token"


@given(st.text(max_size=200))
def test_verify_never_raises(token: str) -> None:
    assert isinstance(TokenVerifier("HS256", SECRET).verify(token, NOW), AuthFailure)


def test_payload_that_is_not_an_object_is_refused() -> None:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(b"[1, 2]")
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    token = f"{head}.{body}.{_b64(mac)}"
    assert _failure(TokenVerifier("HS256", SECRET).verify(token, NOW)) == "invalid token"


def test_audience_is_refused() -> None:
    assert _failure(_verify({"sub": "alice", "aud": "another-service"})) == "invalid token"


# -- time claims ---------------------------------------------------------------------


def test_expiry_is_checked_against_now() -> None:
    payload = {"sub": "alice", "exp": NOW + 60}
    assert isinstance(_verify(payload, NOW + 59.9), Claims)
    assert _failure(_verify(payload, NOW + 60)) == "token expired"
    assert _failure(_verify(payload, NOW + 3600)) == "token expired"


def test_no_exp_means_no_expiry() -> None:
    token = mint_token(SECRET, "alice", ttl_s=None, now=NOW)
    claims = TokenVerifier("HS256", SECRET).verify(token, NOW + 10**9)
    assert claims == Claims(sub="alice", exp=None)


def test_fractional_exp_is_kept() -> None:
    claims = _verify({"sub": "alice", "exp": NOW + 0.5})
    assert isinstance(claims, Claims)
    assert claims.exp == NOW + 0.5


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_future_nbf_and_iat_fail_beyond_leeway(claim: str) -> None:
    assert isinstance(_verify({"sub": "alice", claim: NOW + 30}), Claims)
    assert _failure(_verify({"sub": "alice", claim: NOW + 31})) == "token not yet valid"
    assert isinstance(_verify({"sub": "alice", claim: NOW - 10**6}), Claims)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["soon", True, None, [1], float("inf"), float("nan"), 10**400])
def test_time_claims_must_be_finite_numbers(claim: str, value: object) -> None:
    result = _verify({"sub": "alice", claim: value})
    if value is None:  # JSON null: the claim is as good as absent
        assert isinstance(result, Claims)
    else:
        assert _failure(result) == f"token has an invalid `{claim}` claim"


# -- sub and rooms -------------------------------------------------------------------


@pytest.mark.parametrize("sub", [None, "", 42, "a b", "al/ice", "x" * 129, ["alice"]])
def test_sub_must_be_a_name(sub: object) -> None:
    payload = {} if sub is None else {"sub": sub}
    assert "sub" in _failure(_verify(payload))


def test_sub_may_use_every_name_character() -> None:
    claims = _verify({"sub": "A-z_0.9:x"})
    assert isinstance(claims, Claims)
    assert claims.sub == "A-z_0.9:x"


@pytest.mark.parametrize(
    "rooms",
    [
        "chat.*",
        {"chat": True},
        [1],
        [None],
        [""],
        ["chat lobby"],
        ["chat/*"],
        ["?"],
        ["x" * 129],
        ["a"] * (MAX_ROOM_PATTERNS + 1),
    ],
)
def test_rooms_claim_must_be_a_list_of_patterns(rooms: object) -> None:
    assert "rooms" in _failure(_verify({"sub": "alice", "rooms": rooms}))


def test_absent_or_empty_rooms_grant_nothing() -> None:
    for payload in ({"sub": "alice"}, {"sub": "alice", "rooms": []}):
        claims = _verify(payload)
        assert isinstance(claims, Claims)
        assert claims.rooms == ()
        assert not claims.may_join("lobby")


# -- room patterns -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "room", "expected"),
    [
        ("chat.*", "chat.lobby", True),
        ("chat.*", "chat.a.b:c", True),
        ("chat.*", "chat.", True),
        ("chat.*", "chat", False),
        ("chat.*", "chatx", False),
        ("chat.*", "xchat.lobby", False),
        ("*", "anything.at:all", True),
        ("**", "x", True),
        ("a:*:b", "a:1:b", True),
        ("a:*:b", "a:x:y:b", True),
        ("a:*:b", "a::b", True),
        ("a:*:b", "a:b", False),
        ("a:*:b", "a:1:bc", False),
        ("a.b", "a.b", True),
        ("a.b", "axb", False),
        ("a.b", "a.bc", False),
        ("a.b", "a.", False),
        ("lobby", "lobby2", False),
        ("lobby", "lobb", False),
        ("*.admin", "team.admin", True),
        ("*.admin", "team.admins", False),
        ("ab*ba", "aba", False),
        ("ab*ba", "abba", True),
        ("*a*b*", "xxaxxbxx", True),
        ("*a*b*", "xxbxxaxx", False),
        ("u-*_x", "u-1_x", True),
    ],
)
def test_pattern_matching(pattern: str, room: str, expected: bool) -> None:
    assert Claims("alice", None, (pattern,)).may_join(room) is expected


def test_any_pattern_matching_grants() -> None:
    claims = Claims("alice", None, ("lobby", "team.*", "dm:*:alice"))
    assert claims.may_join("lobby")
    assert claims.may_join("team.red")
    assert claims.may_join("dm:bob:alice")
    assert not claims.may_join("dm:alice:bob")
    assert not claims.may_join("lobby.2")


def test_matching_is_linear_where_backtracking_is_not() -> None:
    """A regex `.*a.*a…b` backtracks for ages on `aaaa…`; the matcher does not."""
    claims = Claims("alice", None, ("*a" * 60 + "*b",))
    assert not claims.may_join("a" * 128)
    assert claims.may_join("a" * 127 + "b")


_ALPHABET = "ab.*"


@given(
    st.lists(st.text(_ALPHABET, min_size=1, max_size=8), max_size=3),
    st.text(_ALPHABET.replace("*", ""), max_size=10),
)
def test_matcher_agrees_with_a_regex(patterns: list[str], room: str) -> None:
    regexes = [
        re.compile(".*".join(re.escape(part) for part in p.split("*")), re.DOTALL) for p in patterns
    ]
    expected = any(r.fullmatch(room) for r in regexes)
    assert Claims("alice", None, tuple(patterns)).may_join(room) is expected


def test_claims_repr_and_equality_ignore_the_compiled_matcher() -> None:
    claims = Claims("alice", 5.0, ("a*",))
    assert claims == Claims("alice", 5.0, ("a*",))
    assert hash(claims) == hash(Claims("alice", 5.0, ("a*",)))
    assert repr(claims) == "Claims(sub='alice', exp=5.0, rooms=('a*',))"


# -- keys, settings, minting ---------------------------------------------------------


def test_from_settings_uses_the_secret(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    key = settings.jwt_key()
    assert key is not None
    token = mint_token(key, "alice", now=NOW)
    assert isinstance(TokenVerifier.from_settings(settings).verify(token, NOW), Claims)


def test_from_settings_reads_the_public_key_file(
    make_settings: Callable[..., Settings], tmp_path: Path, rsa_keys: tuple[KeyPair, KeyPair]
) -> None:
    key_file = tmp_path / "jwt.pub"
    key_file.write_text(rsa_keys[0].public)
    settings = make_settings(jwt_algorithm="RS256", jwt_public_key_file=key_file)
    token = mint_token(rsa_keys[0].private, "alice", algorithm="RS256", now=NOW)
    assert isinstance(TokenVerifier.from_settings(settings).verify(token, NOW), Claims)


def test_from_settings_without_a_key_is_a_config_error(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="jwt_secret"):
        TokenVerifier.from_settings(make_settings(jwt_secret=None))
    with pytest.raises(ConfigError, match="jwt_public_key_file"):
        TokenVerifier.from_settings(make_settings(jwt_algorithm="ES256"))
    # The settings refuse a missing file; one removed after they were read is caught here.
    key_file = tmp_path / "key.pem"
    key_file.write_text("placeholder")
    removed = make_settings(jwt_algorithm="ES256", jwt_public_key_file=key_file)
    key_file.unlink()
    with pytest.raises(ConfigError, match="jwt_public_key_file: cannot read the key file"):
        TokenVerifier.from_settings(removed)


def test_private_key_on_a_verifier_is_a_config_error(
    rsa_keys: tuple[KeyPair, KeyPair],
) -> None:
    with pytest.raises(ConfigError, match="public key"):
        TokenVerifier("RS256", rsa_keys[0].private)


@pytest.mark.parametrize(
    ("algorithm", "key"),
    [("HS256", "short"), ("HS256", ""), ("RS256", "not a pem"), ("ES256", SECRET)],
)
def test_unusable_keys_are_config_errors(algorithm: Algorithm, key: str) -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(algorithm, key)


def test_public_pem_as_hmac_secret_is_a_config_error(rsa_keys: tuple[KeyPair, KeyPair]) -> None:
    with pytest.raises(ConfigError, match="jwt_secret"):
        TokenVerifier("HS256", rsa_keys[0].public)


def test_small_rsa_keys_are_refused() -> None:
    small = _rsa_pair(key_size=1024)
    with pytest.raises(ConfigError, match="2048"):
        TokenVerifier("RS256", small.public)


def test_mint_token_refuses_what_no_verifier_accepts(rsa_keys: tuple[KeyPair, KeyPair]) -> None:
    with pytest.raises(ValueError, match="sub"):
        mint_token(SECRET, "not a name", now=NOW)
    with pytest.raises(ValueError, match="rooms"):
        mint_token(SECRET, "alice", rooms=["chat lobby"], now=NOW)
    with pytest.raises(ValueError, match="algorithm"):
        mint_token(SECRET, "alice", algorithm="none", now=NOW)
    with pytest.raises(ValueError, match="private key"):
        mint_token(rsa_keys[0].public, "alice", algorithm="RS256", now=NOW)


def test_mint_token_rounds_exp_up_and_iat_down() -> None:
    token = mint_token(SECRET, "alice", ttl_s=10, now=NOW + 0.25)
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_signature": False})
    assert payload == {"sub": "alice", "iat": int(NOW), "exp": int(NOW) + 11}


def test_generated_secrets_are_random_and_strong() -> None:
    first, second = generate_secret(), generate_secret()
    assert first != second
    assert len(first.encode()) >= 32
    token = mint_token(first, "alice", now=NOW)
    assert isinstance(TokenVerifier("HS256", first).verify(token, NOW), Claims)

"""JWT checks for `auth`: who the client is, until when, and which rooms it may join.

Sans-I/O: every check takes `now` (epoch seconds), so tests pass fake times. Only the
configured algorithm is accepted (no `alg: none`, no HS256 token on an RS256
verifier). A failure is a value, never an exception, and its message is safe to send
to the client: it never echoes the token. A token with an `aud` claim is refused, as
RFC 7519 §4.1.3 asks of a recipient that is not named in it.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.types import Options

from portao.config import Settings
from portao.errors import ConfigError
from portao.names import is_valid_name

Algorithm = Literal["HS256", "RS256", "ES256"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)

#: How far `nbf` and `iat` may lie in the future (clock skew between issuer and us).
LEEWAY_S = 30.0
#: At most this many room patterns per token: each is compiled once per `auth`.
MAX_ROOM_PATTERNS = 256
ROOM_PATTERN = re.compile(r"[A-Za-z0-9_.:*-]{1,128}")

_DECODE_OPTIONS: Options = {
    "verify_exp": False,  # checked against `now` below
    "verify_nbf": False,
    "verify_iat": False,
    "verify_sub": False,  # `sub` must also be a valid name: checked below
    "enforce_minimum_key_length": True,
}


@dataclass(frozen=True, slots=True)
class _Glob:
    """One pattern with `*`: literal head and tail, literal parts found in order between.

    Greedy leftmost search is exact when `*` is the only wildcard, and it costs one
    pass over the room name: no backtracking, whatever the pattern.
    """

    head: str
    middle: tuple[str, ...]
    tail: str
    min_len: int

    @classmethod
    def compile(cls, pattern: str) -> _Glob:
        head, *rest = pattern.split("*")
        tail = rest.pop()
        middle = tuple(part for part in rest if part)
        return cls(head, middle, tail, len(head) + len(tail) + sum(map(len, middle)))

    def matches(self, room: str) -> bool:
        if len(room) < self.min_len or not (
            room.startswith(self.head) and room.endswith(self.tail)
        ):
            return False
        pos, end = len(self.head), len(room) - len(self.tail)
        for part in self.middle:
            found = room.find(part, pos, end)
            if found < 0:
                return False
            pos = found + len(part)
        return True


@dataclass(frozen=True, slots=True)
class _RoomMatcher:
    """The `rooms` claim compiled once: literal names in a set, globs in a tuple."""

    any_room: bool
    literals: frozenset[str]
    globs: tuple[_Glob, ...]

    @classmethod
    def compile(cls, patterns: Sequence[str]) -> _RoomMatcher:
        literals = frozenset(p for p in patterns if "*" not in p)
        globs = tuple(_Glob.compile(p) for p in dict.fromkeys(patterns) if "*" in p)
        any_room = any(not (g.head or g.middle or g.tail) for g in globs)
        return cls(any_room, literals, () if any_room else globs)

    def matches(self, room: str) -> bool:
        return (
            self.any_room or room in self.literals or any(glob.matches(room) for glob in self.globs)
        )


@functools.lru_cache(maxsize=1024)
def _compiled(patterns: tuple[str, ...]) -> _RoomMatcher:
    """One matcher per `rooms` claim, shared by every connection whose token has it
    (most have the same claim, or none): an idle connection does not hold its own."""
    return _RoomMatcher.compile(patterns)


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid token says: user id, expiry, and the room patterns it grants."""

    sub: str
    exp: float | None
    rooms: tuple[str, ...] = ()
    _matcher: _RoomMatcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_matcher", _compiled(self.rooms))

    def may_join(self, room: str) -> bool:
        """True when a `rooms` pattern matches; `*` matches any run, `.` and `:` too."""
        return self._matcher.matches(room)


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """Why a token was refused, in words safe to send to the client."""

    message: str


class TokenVerifier:
    """Checks tokens against one key and one algorithm, both fixed at start."""

    def __init__(self, algorithm: Algorithm, key: str) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"jwt_algorithm: {algorithm!r} is not one of {ALGORITHMS}")
        self._algorithm = algorithm
        try:
            self._key = _prepare_key(algorithm, key, private=False)
        except ValueError as exc:
            raise ConfigError(f"{_key_setting(algorithm)}: {exc}") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """The verifier the settings describe; `ConfigError` when no key is set."""
        setting = _key_setting(settings.jwt_algorithm)
        try:
            key = settings.jwt_key()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{setting}: cannot read the key file: {exc}") from None
        if not key:
            raise ConfigError(f"{setting}: a key is required for {settings.jwt_algorithm}")
        return cls(settings.jwt_algorithm, key)

    def verify(self, token: str, now: float) -> Claims | AuthFailure:
        """The token's claims, or why it is refused at time `now`."""
        try:
            payload = jwt.decode(
                token, self._key, algorithms=[self._algorithm], options=_DECODE_OPTIONS
            )
        except jwt.PyJWTError:
            return AuthFailure("invalid token")
        return _check_claims(payload, now)


def _key_setting(algorithm: str) -> str:
    return "jwt_secret" if algorithm == "HS256" else "jwt_public_key_file"


def _check_claims(payload: dict[str, Any], now: float) -> Claims | AuthFailure:
    sub = payload.get("sub")
    if not isinstance(sub, str) or not is_valid_name(sub):
        return AuthFailure("token needs a `sub` claim of 1-128 characters [A-Za-z0-9_.:-]")
    times: dict[str, float | None] = {}
    for name in ("exp", "nbf", "iat"):
        try:
            times[name] = _numeric_date(payload.get(name))
        except ValueError:
            return AuthFailure(f"token has an invalid `{name}` claim")
    exp, nbf, iat = times["exp"], times["nbf"], times["iat"]
    if exp is not None and now >= exp:
        return AuthFailure("token expired")
    if any(t is not None and t > now + LEEWAY_S for t in (nbf, iat)):
        return AuthFailure("token not yet valid")
    rooms = payload.get("rooms", [])
    if not _is_room_list(rooms):
        return AuthFailure(
            f"token's `rooms` claim must be a list of at most {MAX_ROOM_PATTERNS} room "
            "patterns of [A-Za-z0-9_.:-] and `*`"
        )
    return Claims(sub=sub, exp=exp, rooms=tuple(rooms))


def _numeric_date(value: object) -> float | None:
    """A JWT NumericDate as float; `ValueError` for booleans, NaN, infinities, text."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    try:
        as_float = float(value)
    except OverflowError:
        raise ValueError("out of range") from None
    if not math.isfinite(as_float):
        raise ValueError("not finite")
    return as_float


def _is_room_list(rooms: object) -> bool:
    return (
        isinstance(rooms, list)
        and len(rooms) <= MAX_ROOM_PATTERNS
        and all(isinstance(r, str) and ROOM_PATTERN.fullmatch(r) for r in rooms)
    )


def _prepare_key(algorithm: str, key: str, *, private: bool) -> Any:
    """Parse a key once; refuse short HMAC secrets, small RSA keys and the wrong half.

    A private key on a verifier, or a public one for signing, is a setup mistake:
    `ValueError` says which, and the caller names the setting.
    """
    alg = jwt.get_algorithm_by_name(algorithm)
    try:
        prepared = alg.prepare_key(key)
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ValueError(f"not a usable {algorithm} key: {exc}") from None
    too_short = alg.check_key_length(prepared)
    if too_short:
        raise ValueError(too_short)
    if algorithm != "HS256":
        is_private = isinstance(prepared, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        if is_private != private:
            raise ValueError(f"{algorithm} needs a PEM {'private' if private else 'public'} key")
    return prepared


def mint_token(
    key: str,
    sub: str,
    *,
    rooms: Sequence[str] | None = None,
    ttl_s: float | None = 3600,
    algorithm: str = "HS256",
    now: float,
) -> str:
    """A signed token for `sub` (key: the HS256 secret or a PEM private key).

    `exp` is `now + ttl_s` rounded up to a whole second; `ttl_s=None` means no
    expiry. Raises `ValueError` for a name or pattern every verifier would refuse.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {algorithm!r}")
    if not is_valid_name(sub):
        raise ValueError(f"sub {sub!r} is not a valid name")
    payload: dict[str, Any] = {"sub": sub, "iat": math.floor(now)}
    if ttl_s is not None:
        payload["exp"] = math.ceil(now + ttl_s)
    if rooms is not None:
        payload["rooms"] = list(rooms)
        if not _is_room_list(payload["rooms"]):
            raise ValueError(f"rooms {list(rooms)!r} are not valid room patterns")
    return jwt.encode(payload, _prepare_key(algorithm, key, private=True), algorithm=algorithm)


def generate_secret() -> str:
    """A random HS256 secret of 256 bits, URL-safe, for a development gateway."""
    return secrets.token_urlsafe(32)

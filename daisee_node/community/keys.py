"""Allocation key files: what they may say, how they are checked, and their canonical hash.

A key file is a small TOML (or JSON) document naming one key and its parameters:

```toml
version = 1
kind = "tiers"                  # prorata | static | tiers | equal
name = "Toit Urban Solar, 2026" # free text, part of the hash
tiers = [["0x5a…", "0x9c…"], ["0x11…"]]
```

`load_key` returns a validated key or raises `ConfigError` listing every problem with its path
(`coefficients."0xab…"`, `tiers[1][0]`). `key_hash` is the sha256 of the key's canonical JSON form:
the digest governance records on chain with the first period the key applies to.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from daisee_node.errors import ConfigError, ConfigProblem
from daisee_node.models import StrictModel

#: member ids are node addresses or short names: safe in CSV, JSON and file names
MEMBER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
_ADDRESS = re.compile(r"^0[xX][0-9a-fA-F]{40}$")
KEY_KINDS = ("prorata", "static", "tiers", "equal")
#: the spellings of a coefficient `Fraction` is given: a decimal (with an exponent or not) or a
#: fraction, ASCII digits only, no `_` (a "%" is taken off first)
_COEFFICIENT = re.compile(
    r"[+-]?(?:(?=\.?\d)(?P<int>\d*)(?:\.(?P<frac>\d*))?(?:[eE](?P<exp>[+-]?\d+))?"
    r"|(?P<num>\d+)/(?P<den>\d+))",
    re.ASCII,
)
#: digits and decimal exponent a coefficient may have: far beyond any meaningful precision, and
#: small enough that reading it costs nothing (`Fraction("1e-9999999")` takes seconds, a larger
#: exponent hours)
MAX_COEFFICIENT_DIGITS = 40
MAX_COEFFICIENT_EXPONENT = 40


def member_id(text: str) -> str:
    """A member id in its one spelling: node addresses in lower case, so a checksummed address and
    its lower-case form name the same member."""
    if not MEMBER_PATTERN.match(text):
        raise ValueError(
            f"member id {text!r} must be 1-100 letters, digits or _.:- (starting with a letter "
            "or digit)"
        )
    return text.lower() if _ADDRESS.match(text) else text


def _member(value: Any) -> Any:
    return member_id(value) if isinstance(value, str) else value


def _unit_interval(value: Fraction) -> Fraction:
    if not 0 <= value <= 1:
        raise ValueError(f"a coefficient lies between 0 and 1 (got {_fraction_text(value)})")
    return value


def _fraction(value: Any) -> Any:
    """An exact coefficient: 0.25, "0.25", "1/3", "25%" or an integer; never a binary float.

    A TOML float goes through its shortest decimal spelling (`repr`), which Python keeps stable,
    so 0.1 is 1/10 on every node, not the nearest binary fraction."""
    if isinstance(value, bool):
        raise ValueError("a coefficient is a number, not a boolean")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return _exact(repr(value), value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            return _exact(text[:-1].strip(), value) / 100
        return _exact(text, value)
    return value


def _exact(text: str, value: Any) -> Fraction:
    """`text` as a Fraction, once its size is known to be reasonable: the digits and the exponent
    are bounded before anything is converted."""
    found = _COEFFICIENT.fullmatch(text)
    if found is None:
        raise ValueError(
            f'coefficient {_short(value)} is not a number (write 0.25, "1/3" or "25%")'
        )
    digits = sum(len(found[g] or "") for g in ("int", "frac", "num", "den"))
    exponent = (found["exp"] or "0").lstrip("+-").lstrip("0")
    if (
        digits > MAX_COEFFICIENT_DIGITS
        or len(exponent) > 3
        or int(exponent or 0) > MAX_COEFFICIENT_EXPONENT
    ):
        raise ValueError(
            f"coefficient {_short(value)} is too long: at most {MAX_COEFFICIENT_DIGITS} digits "
            f"and an exponent between -{MAX_COEFFICIENT_EXPONENT} and {MAX_COEFFICIENT_EXPONENT}"
        )
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f'coefficient {_short(value)} is not a number (write 0.25, "1/3" or "25%")'
        ) from None


def _short(value: Any) -> str:
    """A value as an error message quotes it, cut short: the message stays one line."""
    text = repr(value)
    return text if len(text) <= 44 else text[:40] + "...'"


MemberId = Annotated[str, BeforeValidator(_member)]
Coefficient = Annotated[Fraction, BeforeValidator(_fraction), AfterValidator(_unit_interval)]


class _Key(StrictModel):
    kind: str
    version: Literal[1] = 1
    name: str = ""

    def canonical(self) -> dict[str, Any]:
        """The key as plain JSON data, one spelling per meaning (hashed by `key_hash`)."""
        return {"version": self.version, "kind": self.kind, "name": self.name}


class ProrataKey(_Key):
    """The French default key (Code de l'énergie D315-6): production shared pro rata of each
    consumer's consumption in the period, each capped at its consumption."""

    kind: Literal["prorata"]


class EqualKey(_Key):
    """Equal shares; what a member cannot use is shared equally among the others, until nothing
    more can be placed (every consumer gets min(consumption, level))."""

    kind: Literal["equal"]


class StaticKey(_Key):
    """Fixed coefficients: each listed member gets coefficient × production, capped at its
    consumption; what it cannot use is not given to anyone else (it is surplus)."""

    kind: Literal["static"]
    coefficients: dict[MemberId, Coefficient] = Field(min_length=1)

    @field_validator("coefficients", mode="before")
    @classmethod
    def _each_member_once(cls, coefficients: Any) -> Any:
        # Two spellings of one address would otherwise become one entry, the last one's.
        if isinstance(coefficients, dict):
            first: dict[str, str] = {}
            twice: list[str] = []
            for name in coefficients:
                if not isinstance(name, str) or not MEMBER_PATTERN.match(name):
                    continue  # refused as a member id with its own path
                one = member_id(name)
                if one in first:
                    twice.append(f"{first[one]!r} and {name!r}")
                else:
                    first[one] = name
            if twice:
                raise ValueError(
                    f"{'; '.join(twice)} name the same member (an address in any case is one "
                    "node): give each member once"
                )
        return coefficients

    @field_validator("coefficients")
    @classmethod
    def _sum_at_most_one(cls, coefficients: dict[str, Fraction]) -> dict[str, Fraction]:
        total = sum(coefficients.values(), Fraction(0))
        if total > 1:
            raise ValueError(f"coefficients add up to {_fraction_text(total)}, more than 1")
        return coefficients

    def canonical(self) -> dict[str, Any]:
        return {
            **super().canonical(),
            "coefficients": {m: _fraction_text(c) for m, c in self.coefficients.items()},
        }


class TiersKey(_Key):
    """Priority tiers: tier 1 is served first, pro rata of consumption within the tier and capped
    at it; what a tier cannot use goes to the next. Members in no tier form a last tier."""

    kind: Literal["tiers"]
    tiers: list[Annotated[list[MemberId], Field(min_length=1)]] = Field(min_length=1)

    @field_validator("tiers")
    @classmethod
    def _each_member_once(cls, tiers: list[list[str]]) -> list[list[str]]:
        seen: set[str] = set()
        twice: set[str] = set()
        for tier in tiers:
            for member in tier:
                (twice if member in seen else seen).add(member)
        if twice:
            raise ValueError(f"a member may be in one tier only: {', '.join(sorted(twice))}")
        return tiers

    def canonical(self) -> dict[str, Any]:
        # Order within a tier does not change the allocation; order of the tiers does.
        return {**super().canonical(), "tiers": [sorted(tier) for tier in self.tiers]}


Key = Annotated[ProrataKey | StaticKey | TiersKey | EqualKey, Field(discriminator="kind")]
_KEY = TypeAdapter[ProrataKey | StaticKey | TiersKey | EqualKey](Key)
AnyKey = ProrataKey | StaticKey | TiersKey | EqualKey


def named_members(key: AnyKey) -> list[str]:
    """The member ids a key names, in the file's order (none for prorata and equal)."""
    if isinstance(key, StaticKey):
        return list(key.coefficients)
    if isinstance(key, TiersKey):
        return [m for tier in key.tiers for m in tier]
    return []


def is_address(member: str) -> bool:
    """Whether a member id is a node address (else it is a name from the members file)."""
    return bool(_ADDRESS.match(member))


def _fraction_text(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def canonical_json(key: AnyKey) -> bytes:
    """The bytes `key_hash` digests: sorted keys, no spaces, UTF-8, coefficients as reduced
    fractions ("1/4"), tiers' members sorted, member addresses in lower case."""
    text = json.dumps(key.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def key_hash(key: AnyKey) -> str:
    """sha256 of the key's canonical JSON, as 0x-prefixed hex (a bytes32 on chain).

    Two files that say the same thing (key order, spacing, 0.25 or "1/4", a checksummed or
    lower-case address) have the same hash; any change of meaning changes it."""
    return "0x" + hashlib.sha256(canonical_json(key)).hexdigest()


def parse_key(data: Any, *, source: str = "<key>") -> AnyKey:
    """Validate key data already read from TOML or JSON; every problem at once."""
    try:
        return _KEY.validate_python(data)
    except ValidationError as exc:
        problems = [_problem(err, data) for err in exc.errors()]
        raise ConfigError(source, problems) from None


def load_key(path: str | Path) -> AnyKey:
    """Read a key file (`.json` is JSON, anything else TOML) and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_once_each)
        else:
            data = tomllib.loads(text)  # TOML itself refuses a key given twice
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # tomllib.TOMLDecodeError and json.JSONDecodeError are both ValueErrors.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(path), [ConfigProblem("", reason)]) from None
    return parse_key(data, source=str(path))


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when it gives a key twice (`json` would keep the last silently)."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"the key {name!r} is given twice in one object")
        out[name] = value
    return out


def _problem(err: Any, data: Any) -> ConfigProblem:
    loc = list(err["loc"])
    # The discriminated union puts the key's kind first in the location: not part of the path.
    if loc and isinstance(data, dict) and loc[0] == data.get("kind"):
        loc = loc[1:]
    path = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for a bad mapping key: the path names it already
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            text = str(part)
            text = text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else json.dumps(text)
            path += f".{text}" if path else text
    kind = err["type"]
    if kind == "union_tag_not_found":
        message = f"missing key 'kind' (one of: {', '.join(KEY_KINDS)})"
    elif kind == "union_tag_invalid":
        message = f"unknown kind {err['ctx']['tag']!r}; expected one of: {', '.join(KEY_KINDS)}"
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required key is missing"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
        message = msg[:1].lower() + msg[1:]
    return ConfigProblem(path, message)

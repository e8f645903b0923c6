"""The community's members file and tariff file: what they may say, checked with every problem's
path (as key files are, `daisee_node.community.keys`).

Members file (TOML): which node address is which member.

```toml
version = 1
name = "Toit Urban Solar"                                   # free text
[members]
"0x5aeda56215b167893e80b4fe645ba6d5bab767de" = "alice"      # node address = member name
```

Tariff file (TOML): the community's prices, per kWh, in one currency (docs/community.md).
"""

from __future__ import annotations

import tomllib
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BeforeValidator, Field, ValidationError, field_validator

from daisee_node.community.keys import _ADDRESS, MEMBER_PATTERN, _problem
from daisee_node.errors import ConfigError, ConfigProblem
from daisee_node.models import StrictModel


def _money(value: Any) -> Any:
    """An exact amount: a TOML integer, a float by its shortest decimal spelling, or a string;
    bounded (`MAX_AMOUNT_DIGITS`, `MAX_AMOUNT_DECIMALS`) so that a bill's arithmetic is exact."""
    if isinstance(value, bool):
        raise ValueError("an amount is a number, not a boolean")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        amount = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f'{_quoted(value)} is not an amount (write 0.12 or "0.12")') from None
    elif isinstance(value, Decimal):
        amount = value
    else:
        return value  # pydantic says what it is not
    if not amount.is_finite():
        raise ValueError(f"{_quoted(value)} is not an amount")
    if not amount.is_zero() and amount.adjusted() >= MAX_AMOUNT_DIGITS:
        raise ValueError(
            f"{_quoted(value)} is too large for an amount (at most {MAX_AMOUNT_DIGITS} digits "
            "before the point)"
        )
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_AMOUNT_DECIMALS:
        if amount.is_zero():
            return Decimal(0)
        raise ValueError(f"{_quoted(value)} has more than {MAX_AMOUNT_DECIMALS} decimals")
    return amount


#: an amount (per kWh, per credit or per month) has at most MAX_AMOUNT_DIGITS digits before the
#: point and MAX_AMOUNT_DECIMALS after it: far beyond any tariff
MAX_AMOUNT_DIGITS = 10
MAX_AMOUNT_DECIMALS = 18


def _quoted(value: Any) -> str:
    """`value` as an error message quotes it, cut short so that the message stays one line."""
    text = repr(value)
    return text if len(text) <= 44 else text[:40] + "...'"


Money = Annotated[Decimal, BeforeValidator(_money), Field(ge=0)]


class MembersFile(StrictModel):
    """Which node address is which member: `members` maps addresses (lower case) to names."""

    version: Literal[1] = 1
    name: str = ""
    members: dict[str, str] = Field(min_length=1)

    @field_validator("members", mode="before")
    @classmethod
    def _addresses_and_names(cls, members: Any) -> Any:
        if not isinstance(members, dict):
            return members
        problems = []
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for address, name in members.items():
            if not _ADDRESS.match(str(address)):
                problems.append(f"{address!r} is not a node address (0x and 40 hex digits)")
                continue
            if not isinstance(name, str) or not MEMBER_PATTERN.match(name) or _ADDRESS.match(name):
                problems.append(
                    f"{address}: name {name!r} must be 1-100 letters, digits or _.:- (not an "
                    "address)"
                )
                continue
            if name in seen:
                problems.append(f"name {name!r} is given to {seen[name]} and {address}")
                continue
            if address.lower() in out:
                problems.append(f"{address} is listed twice")
                continue
            seen[name] = address
            out[address.lower()] = name
        if problems:
            raise ValueError("; ".join(problems))
        return out

    def address_of(self, member: str) -> str | None:
        """The address of a member given by name or address (None when it is no member)."""
        text = member.lower() if _ADDRESS.match(member) else member
        if text in self.members:
            return text
        for address, name in self.members.items():
            if name == member:
                return address
        return None


class Tariff(StrictModel):
    """The community's prices (currency per kWh) and how a bill rounds them."""

    version: Literal[1] = 1
    name: str = ""
    currency: str = Field(default="EUR", pattern=r"^[A-Za-z]{3}$")
    timezone: str = "UTC"
    decimals: int = Field(default=2, ge=0, le=6)
    local_price: Money
    producer_price: Money | None = None
    surplus_price: Money = Decimal(0)
    monthly_fee: Money = Decimal(0)
    credit_price: Money | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r} (e.g. Europe/Paris, UTC)") from None
        return zone

    @property
    def producer(self) -> Decimal:
        """What a producer is paid per kWh the key allocated from its production."""
        return self.local_price if self.producer_price is None else self.producer_price

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def _read_toml(path: Path) -> Any:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(path), [ConfigProblem("", reason)]) from None


def load_members(path: str | Path) -> MembersFile:
    """Read and check a members file; `ConfigError` with every problem otherwise."""
    path = Path(path)
    data = _read_toml(path)
    try:
        return MembersFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), [_problem(e, data) for e in exc.errors()]) from None


def load_tariff(path: str | Path) -> Tariff:
    """Read and check a tariff file; `ConfigError` with every problem otherwise."""
    path = Path(path)
    data = _read_toml(path)
    try:
        return Tariff.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), [_problem(e, data) for e in exc.errors()]) from None

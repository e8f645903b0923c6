"""What every config section shares: strict models and the one pattern for names.

Kept apart from any room (sensors, rules, relays, ledger, MQTT) so each can import it without
importing another.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

#: sensors, channels, relays, rules and groups are named with it; it keeps names safe in MQTT
#: topics, file names and rule expressions alike
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


def not_empty_path(value: Any) -> Any:
    """A `mode="before"` check for path keys: an empty string would be the current folder."""
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("empty_path", "an empty path; name a file or a folder")
    return value


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "expected a number, not a boolean")
    return value


def _is_bool_check(schema: Any) -> bool:
    function = schema.get("function") if schema.get("type") == "function-before" else None
    return isinstance(function, dict) and function.get("function") is _refuse_bool


def _numbers_refuse_bools(schema: Any, *, root: bool = True) -> Any:
    """A copy of a core schema in which every int and float schema refuses booleans first.

    Works on the schema rather than on annotations, so that numbers anywhere (lists, unions,
    optional values, nested sections) are covered with their own path in the error. A nested
    section's schema already went through this when its own class was made."""
    if isinstance(schema, list):
        return [_numbers_refuse_bools(item, root=root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    kind = schema.get("type")
    if _is_bool_check(schema):
        return schema
    if not root and kind == "model" and issubclass(schema["cls"], globals()["StrictModel"]):
        return schema
    copied = {
        key: value
        if key in ("metadata", "serialization")
        else _numbers_refuse_bools(value, root=root and kind != "model")
        for key, value in schema.items()
    }
    if kind in ("int", "float"):
        return core_schema.no_info_before_validator_function(_refuse_bool, copied)
    return copied


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, so a typo is never silently ignored.

    Numbers are numbers: `true` is refused where an integer or a decimal is expected (Python
    would take it for 1), and no decimal may be `inf` or `nan` (TOML allows both; a period, a
    price or a timeout of `inf` only fails later, at run time). An integer is still taken where
    a decimal is expected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[BaseModel], handler: GetCoreSchemaHandler, /
    ) -> CoreSchema:
        return _numbers_refuse_bools(handler(source))

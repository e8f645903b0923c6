"""What every config section shares: strict models and the one pattern for names.

Kept apart from any room (sensors, rules, relays, ledger, MQTT) so each can import it without
importing another.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: sensors, channels, relays, rules and groups are named with it; it keeps names safe in MQTT
#: topics, file names and rule expressions alike
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, so a typo is never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

"""Boolean switches given on the command line.

``python -m monai.bundle run ... --amp false`` hands the config the *string* "false" (fire parses only ``True`` /
``False`` as booleans), which Python treats as true. Every component that takes a switch from a config
(``amp``, ``channels_last``, ``compile``, ``distributed``, ``resume``, ``overwrite``) reads it through
``as_bool``, so ``true``/``false`` in any spelling mean what they say and anything else is refused.
"""

from __future__ import annotations

TRUE = {"true", "yes", "on", "1"}
FALSE = {"false", "no", "off", "0", "none", ""}


def as_bool(value: object, name: str = "flag") -> bool:
    """``value`` as a bool: bools and numbers as Python does; strings true/yes/on/1 and false/no/off/0/none."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
    raise ValueError(f"{name} must be true or false, got {value!r}")

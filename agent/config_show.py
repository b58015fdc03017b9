"""`fleet-agent config show`: the settings the agent uses, as an agent.toml.

The output is TOML that `load_config` reads back to the same settings: each value in TOML
syntax (a JSON scalar or array of strings is one, once what TOML escapes otherwise is
escaped), and every default commented as such, so it doubles as a full example file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from agent.config import SCHEMA


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON escapes quotes, backslashes and the C0 controls as TOML does; the rest (DEL,
        # which TOML wants escaped, and all non-ASCII, to print on any terminal) is escaped
        # here, with TOML's \U for characters beyond the BMP (JSON's surrogate pairs are not
        # TOML).
        return "".join(
            c if c < "\x7f" else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
            for c in json.dumps(value, ensure_ascii=False)
        )
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else toml_value(key)


def render(values: Mapping[str, Mapping[str, Any]], defaults: set[tuple[str, str]]) -> str:
    """``values`` (section -> key -> value, in SCHEMA's order) as agent.toml text; the keys
    in ``defaults`` are marked ``# default``."""
    lines: list[str] = []
    for section, spec in SCHEMA.items():
        tables: list[str] = []
        lines.append(f"[{section}]")
        for key, (kind, _, _) in spec.items():
            value = values[section][key]
            if kind == "table":
                tables.append(key)
                continue
            if value is None:  # a required key the file lacks: load_config refused it
                continue
            mark = "  # default" if (section, key) in defaults else ""
            lines.append(f"{key} = {toml_value(value)}{mark}")
        for key in tables:
            lines.append("")
            mark = "  # default" if (section, key) in defaults else ""
            lines.append(f"[{section}.{key}]{mark}")
            for name, value in values[section][key].items():
                lines.append(f"{toml_key(name)} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)

"""The plugin and the Python side agree on the formats between them (docs/plugin-contract.md).

Read from the C source itself, so a change on one side that the other does not follow fails
here, in a second, before any broker starts: the registry statements the plugin prepares
run against a registry the Python side creates (every schema migration included), and the
option names, property names, topics and control commands are the same strings on both
sides. tests/test_plugin.py and tests/test_attacks.py then exercise them on the wire.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import wire
from broker.config import load_config
from broker.mosquitto import RunFiles, render_conf
from broker.registry import CertificateRole, CertificateStatus, SQLiteRegistry, ThingStatus

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
PLUGIN = (REPO / "broker" / "plugin" / "fleet_plugin.c").read_text()
CONTRACT = (REPO / "docs" / "plugin-contract.md").read_text()


def c_string(expression: str) -> str:
    """The value of adjacent C string literals ("a" "b" -> ab)."""
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', expression))


def prepared_statements() -> list[str]:
    found = re.findall(r"sqlite3_prepare_v2\(registry,\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+),", PLUGIN)
    return [c_string(literal) for literal in found]


def define(name: str) -> str:
    match = re.search(rf'#define {name} "([^"]*)"', PLUGIN)
    assert match, f"{name} is not defined in the plugin"
    return match.group(1)


def test_the_registry_answers_every_statement_the_plugin_prepares(tmp_path: Path) -> None:
    statements = prepared_statements()
    assert len(statements) == 3, statements  # CONNECT, claim's thing probe, revocation sweep
    SQLiteRegistry.open(tmp_path / "registry.db").close()
    with sqlite3.connect(f"file:{tmp_path / 'registry.db'}?mode=ro", uri=True) as db:
        for statement in statements:
            db.execute(statement, ("x",) if "?1" in statement else ()).fetchall()


def test_the_statuses_and_roles_the_plugin_compares_are_the_registrys() -> None:
    compared = set(re.findall(r"'([A-Z_]+)'", " ".join(prepared_statements())))
    compared |= set(re.findall(r'strcmp\([^,]+, "([A-Z_]+)"\)', PLUGIN))
    known = {s.value for s in CertificateStatus} | {s.value for s in ThingStatus}
    assert compared and compared <= known, compared - known
    roles = set(re.findall(r'strcmp\([^,]+, "(device|claim|service)"\)', PLUGIN))
    assert roles <= {r.value for r in CertificateRole}


def test_the_options_the_plugin_reads_are_the_ones_rendered_and_documented(
    tmp_path: Path,
) -> None:
    read = set(re.findall(r'!strcmp\(opts\[i\]\.key, "([a-z_]+)"\)', PLUGIN))
    config = load_config(tmp_path, port=18883)
    conf = render_conf(config, RunFiles(tmp_path / "run"), None)
    # Mosquitto loads the copy in its run folder: its user reaches that wherever the project
    # lives (a clone in a private folder, a venv under /root).
    assert f"plugin {RunFiles(tmp_path / 'run').plugin}\n" in conf
    rendered = set(re.findall(r"^plugin_opt_([a-z_]+) ", conf, re.MULTILINE))
    documented = set(re.findall(r"`plugin_opt_([a-z_]+)`", CONTRACT))
    assert read == rendered == documented, (read, rendered, documented)


def test_property_names_topics_and_commands_are_the_same_strings() -> None:
    prefix = define("PROP_PREFIX")
    for name in ("sender", "reply-to", "connection"):
        assert f'PROP_PREFIX "{name}"' in PLUGIN, name
    assert {wire.PROPERTY_SENDER, wire.PROPERTY_REPLY_TO, wire.PROPERTY_CONNECTION} == {
        f"{prefix}sender",
        f"{prefix}reply-to",
        f"{prefix}connection",
    }
    assert define("CONTROL_TOPIC") == wire.CONTROL_TOPIC
    assert define("EVENT_FIRST_CONNECT_TOPIC") == wire.FIRST_CONNECT_TOPIC
    assert '"kick-certificate %64s"' in PLUGIN
    for documented in (
        wire.CONTROL_TOPIC,
        wire.FIRST_CONNECT_TOPIC,
        wire.PROPERTY_SENDER,
        wire.PROPERTY_REPLY_TO,
        wire.PROPERTY_CONNECTION,
        "kick-certificate <certificate id>",
        define("SINK_TOPIC"),
    ):
        assert f"`{documented}" in CONTRACT, documented
    assert f"#define OPERATOR_ID_PREFIX '{wire.OPERATOR_CLIENT_ID_PREFIX}'" in PLUGIN


def test_the_sender_stamp_is_written_in_the_order_it_is_parsed() -> None:
    """add_sender's format string, fed to broker.identity.sender_of's parser."""
    from broker.identity import sender_of

    fmt = re.search(r'snprintf\(sender, sender_len, "([^"]+)"', PLUGIN)
    assert fmt and fmt.group(1) == "%llu %s %s %s %s"  # connection role cert thing client id
    stamp = "17 device " + "ab" * 32 + " dev-1 client id with spaces"

    message = SimpleNamespace(
        properties=SimpleNamespace(UserProperty=[(wire.PROPERTY_SENDER, stamp)])
    )  # the shape of paho's MQTTMessage
    sender = sender_of(message)
    assert sender is not None
    assert (sender.connection, sender.role, sender.thing, sender.client_id) == (
        "17",
        "device",
        "dev-1",
        "client id with spaces",
    )

"""AWS IoT fleet provisioning templates: loading and evaluation.

Templates live in a folder as ``<templateName>.json`` (a sibling ``<templateName>.hook.json``
holds the pre-provisioning hook and is read elsewhere). `load_templates` checks their structure
once, so an operator sees a broken template at start-up; `evaluate` is pure: it resolves a
template against the parameters of one RegisterThing request and returns a `ProvisioningPlan`
(what to create), raising `Rejection` (400 InvalidParameters) for whatever the device or the
template got wrong.

Supported, as on AWS: ``Parameters`` (Type String, Number or CommaDelimitedList, optional
Default), ``Mappings``, ``Resources`` of type ``AWS::IoT::Thing``, ``AWS::IoT::Certificate``
(``CertificateId`` only) and ``AWS::IoT::Policy``, ``DeviceConfiguration`` (flat strings), the
pseudo-parameter ``AWS::IoT::Certificate::Id`` and the intrinsics ``Ref``, ``Fn::Join``,
``Fn::Select``, ``Fn::Split``, ``Fn::FindInMap`` and ``Fn::Sub``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent import wire
from agent.durable import write_atomic
from broker.rejection import Rejection, invalid_parameters

TEMPLATE_NAME_RE = re.compile(r"^[0-9A-Za-z_-]{1,36}$")
MAX_TEMPLATE_BYTES = 10240
CERTIFICATE_ID_PARAMETER = "AWS::IoT::Certificate::Id"
HOOK_SUFFIX = ".hook.json"

# RegisterThing limits of the control-plane API, applied to the MQTT API too.
MAX_PARAMETER_NAME_CHARS = 2048
MAX_PARAMETER_VALUE_CHARS = 4096
# Deeper nesting than this in a 10 KiB template is an attack or a mistake, not a template.
MAX_NESTING = 64

THING = "AWS::IoT::Thing"
CERTIFICATE = "AWS::IoT::Certificate"
POLICY = "AWS::IoT::Policy"
RESOURCE_TYPES = (THING, CERTIFICATE, POLICY)
PARAMETER_TYPES = ("String", "Number", "CommaDelimitedList")

OVERRIDE_ACTIONS = ("DO_NOTHING", "REPLACE", "FAIL", "MERGE")
# Property -> actions allowed for it. The docs also spell the keys in upper snake case.
_OVERRIDABLE: dict[str, dict[str, tuple[str, ...]]] = {
    THING: {
        "AttributePayload": OVERRIDE_ACTIONS,
        "ThingGroups": OVERRIDE_ACTIONS,
        "ThingTypeName": ("DO_NOTHING", "REPLACE", "FAIL"),
    },
    CERTIFICATE: {"Status": ("DO_NOTHING", "REPLACE", "FAIL")},
    POLICY: {},
}
_OVERRIDE_ALIASES = {
    "ATTRIBUTE_PAYLOAD": "AttributePayload",
    "THING_GROUPS": "ThingGroups",
    "THING_TYPE_NAME": "ThingTypeName",
    "STATUS": "Status",
}

_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_SUB_RE = re.compile(r"\$\{([^}]*)\}")

Json = Any  # a value decoded from JSON, possibly holding intrinsic functions


class TemplateLoadError(Exception):
    """A template file that cannot be used, with the file and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Template:
    name: str
    body: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class ThingPlan:
    name: str
    attributes: dict[str, str] = field(default_factory=dict)
    thing_groups: list[str] = field(default_factory=list)
    thing_type: str | None = None
    billing_group: str | None = None
    # Property name (AttributePayload, ThingGroups, ThingTypeName) -> DO_NOTHING/REPLACE/FAIL/MERGE.
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CertificatePlan:
    certificate_id: str
    status: Literal["ACTIVE", "INACTIVE"] = "ACTIVE"
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyPlan:
    logical_id: str
    name: str | None = None  # an existing policy, or
    document: dict[str, Any] | None = None  # an inline policy document


@dataclass(frozen=True)
class ProvisioningPlan:
    thing: ThingPlan | None
    certificate: CertificatePlan | None
    policies: list[PolicyPlan]
    device_configuration: dict[str, str]
    parameters: dict[str, str]


# --------------------------------------------------------------------------------------------
# The default template


DEFAULT_TEMPLATE_NAME = "fleet-default"
DEFAULT_TEMPLATE: dict[str, Any] = {
    "Description": "Default fleet template: thing <DeviceModel>-<SerialNumber> in group 'fleet'",
    "Parameters": {
        "SerialNumber": {"Type": "String"},
        "DeviceModel": {"Type": "String", "Default": "generic"},
    },
    "Resources": {
        "thing": {
            "Type": THING,
            "Properties": {
                "ThingName": {"Fn::Join": ["-", [{"Ref": "DeviceModel"}, {"Ref": "SerialNumber"}]]},
                "AttributePayload": {
                    "model": {"Ref": "DeviceModel"},
                    "serial": {"Ref": "SerialNumber"},
                },
                "ThingGroups": ["fleet"],
            },
            "OverrideSettings": {
                "AttributePayload": "MERGE",
                "ThingGroups": "DO_NOTHING",
                "ThingTypeName": "REPLACE",
            },
        },
        "certificate": {
            "Type": CERTIFICATE,
            "Properties": {
                "CertificateId": {"Ref": CERTIFICATE_ID_PARAMETER},
                "Status": "ACTIVE",
            },
        },
        "policy": {"Type": POLICY, "Properties": {"PolicyName": "fleet-device"}},
    },
    "DeviceConfiguration": {"shadowSyncSeconds": "30"},
}


def write_default_template(folder: Path) -> Path:
    """Write `DEFAULT_TEMPLATE` as ``<folder>/fleet-default.json`` unless that file exists."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{DEFAULT_TEMPLATE_NAME}.json"
    if path.exists():
        return path
    text = json.dumps(DEFAULT_TEMPLATE, indent=2) + "\n"
    write_atomic(path, text.encode(), 0o644, replace=False)  # never over one written meanwhile
    return path


# --------------------------------------------------------------------------------------------
# Loading


def load_templates(folder: Path) -> dict[str, Template]:
    """Every ``<name>.json`` template in `folder` by name (``*.hook.json`` files are skipped)."""
    templates: dict[str, Template] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(".json") or path.name.endswith(HOOK_SUFFIX):
            continue
        if not path.is_file():
            continue
        template = load_template(path)
        templates[template.name] = template
    return templates


def load_template(path: Path) -> Template:
    """The template in `path`, named after the file; `TemplateLoadError` if it is unusable."""
    path = Path(path)
    if not path.name.endswith(".json"):
        raise TemplateLoadError(path, "a template file name must end in .json")
    name = path.name.removesuffix(".json")
    if not TEMPLATE_NAME_RE.match(name):
        raise TemplateLoadError(
            path, f"template name {name!r} must be 1-36 characters of 0-9 A-Z a-z _ -"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TemplateLoadError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise TemplateLoadError(
            path, f"template body is {len(raw)} bytes, more than {MAX_TEMPLATE_BYTES}"
        )
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise TemplateLoadError(path, "template is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise TemplateLoadError(
            path, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise TemplateLoadError(path, "invalid JSON: nested too deeply") from None
    problem = check_template_body(body)
    if problem:
        raise TemplateLoadError(path, problem)
    description = body.get("Description")
    return Template(
        name=name, body=body, description=description if isinstance(description, str) else ""
    )


def check_template_body(body: object) -> str | None:
    """What is structurally wrong with a template body, or None.

    Only what can be told without parameters: section shapes, resource types, parameter types,
    override settings, mapping values. Intrinsics are checked when the template is evaluated.
    """
    if not isinstance(body, dict):
        return "a template must be a JSON object"
    if _depth(body) > MAX_NESTING:
        return f"template nests deeper than {MAX_NESTING} levels"
    if "Description" in body and not isinstance(body["Description"], str):
        return "Description must be a string"

    parameters = body.get("Parameters", {})
    if not isinstance(parameters, dict):
        return "Parameters must be an object"
    for name, spec in parameters.items():
        if name.startswith("AWS::"):
            return f"parameter {name!r}: names starting with AWS:: are reserved"
        if not isinstance(spec, dict):
            return f"parameter {name!r} must be an object"
        kind = spec.get("Type")
        if kind not in PARAMETER_TYPES:
            return f"parameter {name!r}: Type must be one of {', '.join(PARAMETER_TYPES)}"
        if "Default" in spec and _default_text(spec["Default"]) is None:
            return f"parameter {name!r}: Default must be a string"

    mappings = body.get("Mappings", {})
    if not isinstance(mappings, dict):
        return "Mappings must be an object"
    for map_name, table in mappings.items():
        if not isinstance(table, dict):
            return f"mapping {map_name!r} must be an object of objects"
        for key, values in table.items():
            if not isinstance(values, dict):
                return f"mapping {map_name!r} key {key!r} must be an object"
            for value_name, value in values.items():
                if not _is_str_or_str_list(value):
                    return (
                        f"mapping {map_name!r}/{key}/{value_name} must be a string or a list of "
                        "strings (no functions in Mappings)"
                    )

    resources = body.get("Resources")
    if resources is None:
        return "Resources is missing"
    if not isinstance(resources, dict):
        return "Resources must be an object"
    seen: dict[str, str] = {}
    for logical_id, resource in resources.items():
        if not isinstance(resource, dict):
            return f"resource {logical_id!r} must be an object"
        kind = resource.get("Type")
        if kind not in RESOURCE_TYPES:
            return f"resource {logical_id!r}: Type must be one of {', '.join(RESOURCE_TYPES)}"
        if kind in (THING, CERTIFICATE):
            if kind in seen:
                return f"resources {seen[kind]!r} and {logical_id!r}: only one {kind} is allowed"
            seen[kind] = logical_id
        if not isinstance(resource.get("Properties", {}), dict):
            return f"resource {logical_id!r}: Properties must be an object"
        try:
            _overrides(kind, resource.get("OverrideSettings"))
        except Rejection as rejection:
            return f"resource {logical_id!r}: {rejection.error_message}"

    if not isinstance(body.get("DeviceConfiguration", {}), dict):
        return "DeviceConfiguration must be an object"
    return None


def _depth(value: object, level: int = 0) -> int:
    if level > MAX_NESTING:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _default_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return json.dumps(value)
    return None


def _is_str_or_str_list(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    )


# --------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    template: Template, parameters: Mapping[str, str], *, certificate_id: str
) -> ProvisioningPlan:
    """What RegisterThing must create for these parameters and this certificate.

    `parameters` are the request's ``parameters`` (with any hook overrides already merged in);
    `certificate_id` is the id of the certificate the ownership token was issued for and is
    the value of the pseudo-parameter ``AWS::IoT::Certificate::Id``. Raises `Rejection`.
    """
    body = template.body
    problem = check_template_body(body)
    if problem:
        # Templates from files were checked at load time; this catches ones built in code.
        raise invalid_parameters(f"Template {template.name} is invalid: {problem}")
    evaluator = _Evaluator(body, _resolve_parameters(body, parameters), certificate_id)

    thing: ThingPlan | None = None
    certificate: CertificatePlan | None = None
    policies: list[PolicyPlan] = []
    for logical_id, resource in body["Resources"].items():
        kind = resource["Type"]
        properties = evaluator.evaluate(resource.get("Properties", {}), f"Resources.{logical_id}")
        if not isinstance(properties, dict):
            raise invalid_parameters(f"Resources.{logical_id}.Properties must be an object")
        overrides = _overrides(kind, resource.get("OverrideSettings"))
        if kind == THING:
            thing = _thing_plan(logical_id, properties, overrides)
        elif kind == CERTIFICATE:
            certificate = _certificate_plan(logical_id, properties, overrides, certificate_id)
        else:
            policies.append(_policy_plan(logical_id, properties))

    configuration = evaluator.evaluate(body.get("DeviceConfiguration", {}), "DeviceConfiguration")
    if not isinstance(configuration, dict):
        raise invalid_parameters("DeviceConfiguration must be an object")
    device_configuration: dict[str, str] = {}
    for key, value in configuration.items():
        if not isinstance(value, str):
            raise invalid_parameters(
                f"DeviceConfiguration.{key} must evaluate to a string, not {_kind(value)} "
                "(nested objects are not supported)"
            )
        device_configuration[key] = value

    return ProvisioningPlan(
        thing=thing,
        certificate=certificate,
        policies=policies,
        device_configuration=device_configuration,
        parameters=dict(evaluator.parameters),
    )


def _resolve_parameters(body: Mapping[str, Any], supplied: object) -> dict[str, str]:
    """The request's parameters plus the declared defaults; rejects missing or bad values."""
    if not isinstance(supplied, Mapping):
        raise invalid_parameters("parameters must be an object of string values")
    resolved: dict[str, str] = {}
    for name, value in supplied.items():
        if not isinstance(name, str) or not name:
            raise invalid_parameters("Parameter names must be non-empty strings")
        if len(name) > MAX_PARAMETER_NAME_CHARS:
            raise invalid_parameters(
                f"Parameter names must be at most {MAX_PARAMETER_NAME_CHARS} characters"
            )
        if name.startswith("AWS::"):
            raise invalid_parameters(f"Parameter {name} is reserved and cannot be supplied")
        if not isinstance(value, str):
            raise invalid_parameters(f"Parameter {name} must be a string, not {_kind(value)}")
        if len(value) > MAX_PARAMETER_VALUE_CHARS:
            raise invalid_parameters(
                f"Parameter {name} is longer than {MAX_PARAMETER_VALUE_CHARS} characters"
            )
        resolved[name] = value
    for name, spec in body.get("Parameters", {}).items():
        if name not in resolved:
            if "Default" not in spec:
                raise invalid_parameters(f"Missing required parameter: {name}")
            resolved[name] = _default_text(spec["Default"]) or ""
        if spec["Type"] == "Number" and not _NUMBER_RE.match(resolved[name]):
            raise invalid_parameters(f"Parameter {name} must be a number")
    return resolved


class _Evaluator:
    def __init__(
        self, body: Mapping[str, Any], parameters: dict[str, str], certificate_id: str
    ) -> None:
        self.parameters = parameters
        self.certificate_id = certificate_id
        self.mappings: Mapping[str, Any] = body.get("Mappings", {})
        self.lists = {
            name
            for name, spec in body.get("Parameters", {}).items()
            if spec["Type"] == "CommaDelimitedList"
        }

    def evaluate(self, node: Json, where: str, depth: int = 0) -> Json:
        if depth > MAX_NESTING:
            raise invalid_parameters(f"{where} nests deeper than {MAX_NESTING} levels")
        if isinstance(node, list):
            return [self.evaluate(item, where, depth + 1) for item in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, argument),) = node.items()
            if key == "Ref":
                return self._ref(argument, where, depth)
            if key.startswith("Fn::"):
                handler = _FUNCTIONS.get(key)
                if handler is None:
                    raise invalid_parameters(f"Unsupported intrinsic function {key} in {where}")
                return handler(self, argument, f"{where}.{key}", depth + 1)
        return {key: self.evaluate(value, where, depth + 1) for key, value in node.items()}

    def lookup(self, name: str) -> str | list[str]:
        if name == CERTIFICATE_ID_PARAMETER:
            return self.certificate_id
        if name in self.parameters:
            value = self.parameters[name]
            if name in self.lists:
                return [item.strip() for item in value.split(",")]
            return value
        raise invalid_parameters(f"Cannot resolve reference value: {name}")

    def _ref(self, argument: Json, where: str, depth: int) -> Json:
        name = self.evaluate(argument, where, depth + 1)
        if not isinstance(name, str):
            raise invalid_parameters(f"Ref in {where} must name a parameter")
        return self.lookup(name)

    def _join(self, argument: Json, where: str, depth: int) -> str:
        delimiter, items = self._pair(argument, where, depth, "[delimiter, [values...]]")
        if not isinstance(delimiter, str) or not isinstance(items, list):
            raise _shape(where, "[delimiter, [values...]]")
        if not all(isinstance(item, str) for item in items):
            raise invalid_parameters(f"{where}: every value to join must be a string")
        return delimiter.join(items)

    def _select(self, argument: Json, where: str, depth: int) -> Json:
        index, items = self._pair(argument, where, depth, "[index, [values...]]")
        if not isinstance(items, list):
            raise _shape(where, "[index, [values...]]")
        if isinstance(index, str) and index.isascii() and index.isdigit():
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool):
            raise invalid_parameters(f"{where}: index must be a non-negative integer")
        if not 0 <= index < len(items):
            raise invalid_parameters(
                f"{where}: index {index} is out of range for a list of {len(items)}"
            )
        if items[index] is None:
            raise invalid_parameters(f"{where}: selected value is null")
        return items[index]

    def _split(self, argument: Json, where: str, depth: int) -> list[str]:
        delimiter, text = self._pair(argument, where, depth, "[delimiter, string]")
        if not isinstance(delimiter, str) or not delimiter or not isinstance(text, str):
            raise _shape(where, "[delimiter, string] with a non-empty delimiter")
        return text.split(delimiter)

    def _find_in_map(self, argument: Json, where: str, depth: int) -> Json:
        expected = "[mapName, topLevelKey, secondLevelKey]"
        if not isinstance(argument, list) or len(argument) != 3:
            raise _shape(where, expected)
        keys = [self.evaluate(item, where, depth + 1) for item in argument]
        if not all(isinstance(key, str) for key in keys):
            raise _shape(where, f"{expected} of strings")
        map_name, first, second = keys
        table = self.mappings.get(map_name)
        if not isinstance(table, dict):
            raise invalid_parameters(f"{where}: mapping {map_name} does not exist")
        values = table.get(first)
        if not isinstance(values, dict):
            raise invalid_parameters(f"{where}: mapping {map_name} has no key {first}")
        if second not in values:
            raise invalid_parameters(f"{where}: mapping {map_name}/{first} has no key {second}")
        value = values[second]
        return list(value) if isinstance(value, list) else value

    def _sub(self, argument: Json, where: str, depth: int) -> str:
        variables: dict[str, Json] = {}
        if isinstance(argument, list):
            if len(argument) != 2 or not isinstance(argument[1], dict):
                raise _shape(where, '"text" or ["text", {variables}]')
            text = self.evaluate(argument[0], where, depth + 1)
            variables = {
                name: self.evaluate(value, where, depth + 1) for name, value in argument[1].items()
            }
        else:
            text = argument
        if not isinstance(text, str):
            raise _shape(where, '"text" or ["text", {variables}]')

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            value = variables[name] if name in variables else self.lookup(name)
            if not isinstance(value, str):
                raise invalid_parameters(f"{where}: ${{{name}}} must be a string")
            return value

        return _SUB_RE.sub(replace, text)

    def _pair(self, argument: Json, where: str, depth: int, expected: str) -> tuple[Json, Json]:
        if not isinstance(argument, list) or len(argument) != 2:
            raise _shape(where, expected)
        first, second = argument
        return self.evaluate(first, where, depth + 1), self.evaluate(second, where, depth + 1)


_FUNCTIONS = {
    "Fn::Join": _Evaluator._join,
    "Fn::Select": _Evaluator._select,
    "Fn::Split": _Evaluator._split,
    "Fn::FindInMap": _Evaluator._find_in_map,
    "Fn::Sub": _Evaluator._sub,
}


def _shape(where: str, expected: str) -> Rejection:
    return invalid_parameters(f"{where} expects {expected}")


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return type(value).__name__


def _overrides(kind: str, settings: object) -> dict[str, str]:
    """Validated OverrideSettings with keys normalised to property names."""
    if settings is None:
        return {}
    allowed = _OVERRIDABLE[kind]
    if not isinstance(settings, dict):
        raise invalid_parameters("OverrideSettings must be an object")
    if settings and not allowed:
        raise invalid_parameters(f"OverrideSettings are not available for {kind}")
    overrides: dict[str, str] = {}
    for key, action in settings.items():
        prop = _OVERRIDE_ALIASES.get(key, key)
        if prop not in allowed:
            raise invalid_parameters(
                f"OverrideSettings.{key} is not settable (one of {', '.join(allowed)})"
            )
        if action not in allowed[prop]:
            raise invalid_parameters(
                f"OverrideSettings.{key} must be one of {', '.join(allowed[prop])}"
            )
        overrides[prop] = action
    return overrides


def _optional_str(properties: Mapping[str, Json], name: str, where: str) -> str | None:
    value = properties.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid_parameters(f"{where}.{name} must be a string, not {_kind(value)}")
    return value


def _thing_plan(
    logical_id: str, properties: Mapping[str, Json], overrides: dict[str, str]
) -> ThingPlan:
    where = f"Resources.{logical_id}"
    name = _optional_str(properties, "ThingName", where)
    if name is None:
        raise invalid_parameters(f"{where}.ThingName is required")
    if not wire.THING_NAME_PATTERN.fullmatch(name):
        raise invalid_parameters(
            f"ThingName must be 1-128 characters of A-Z a-z 0-9 : _ - "
            f"(the evaluated name has {len(name)} characters)"
        )
    attributes = properties.get("AttributePayload", {})
    if not isinstance(attributes, dict):
        raise invalid_parameters(f"{where}.AttributePayload must be an object")
    for key, value in attributes.items():
        if not isinstance(value, str):
            raise invalid_parameters(f"{where}.AttributePayload.{key} must be a string")
    groups = properties.get("ThingGroups", [])
    if not isinstance(groups, list) or not all(isinstance(group, str) for group in groups):
        raise invalid_parameters(f"{where}.ThingGroups must be a list of strings")
    return ThingPlan(
        name=name,
        attributes=dict(attributes),
        thing_groups=list(dict.fromkeys(groups)),
        thing_type=_optional_str(properties, "ThingTypeName", where),
        billing_group=_optional_str(properties, "BillingGroup", where),
        overrides=overrides,
    )


def _certificate_plan(
    logical_id: str,
    properties: Mapping[str, Json],
    overrides: dict[str, str],
    certificate_id: str,
) -> CertificatePlan:
    where = f"Resources.{logical_id}"
    other = sorted(
        {"CertificateSigningRequest", "CertificatePem", "CACertificatePem"} & properties.keys()
    )
    if other:
        raise invalid_parameters(
            f"{where}: only CertificateId can be used in fleet provisioning, not {other[0]}"
        )
    value = properties.get("CertificateId", properties.get("CertificateID"))
    if value != certificate_id:
        raise invalid_parameters("CertificateId must be the certificate of the ownership token")
    status = properties.get("Status", "ACTIVE")
    if not isinstance(status, str) or status.upper() not in ("ACTIVE", "INACTIVE"):
        raise invalid_parameters(f"{where}.Status must be ACTIVE or INACTIVE")
    return CertificatePlan(
        certificate_id=certificate_id,
        status="ACTIVE" if status.upper() == "ACTIVE" else "INACTIVE",
        overrides=overrides,
    )


def _policy_plan(logical_id: str, properties: Mapping[str, Json]) -> PolicyPlan:
    where = f"Resources.{logical_id}"
    name = properties.get("PolicyName")
    document = properties.get("PolicyDocument")
    if (name is None) == (document is None):
        raise invalid_parameters(f"{where}: specify exactly one of PolicyName or PolicyDocument")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise invalid_parameters(f"{where}.PolicyName must be a non-empty string")
        return PolicyPlan(logical_id=logical_id, name=name)
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except (json.JSONDecodeError, RecursionError):
            raise invalid_parameters(f"{where}.PolicyDocument is not valid JSON") from None
    if not isinstance(document, dict):
        raise invalid_parameters(f"{where}.PolicyDocument must be a JSON object")
    return PolicyPlan(logical_id=logical_id, document=document)

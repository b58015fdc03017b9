"""broker/templates.py: loading and evaluating fleet provisioning templates (no broker needed)."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from broker import rejection
from broker.rejection import Rejection
from broker.templates import (
    DEFAULT_TEMPLATE,
    DEFAULT_TEMPLATE_NAME,
    CertificatePlan,
    PolicyPlan,
    ProvisioningPlan,
    Template,
    TemplateLoadError,
    ThingPlan,
    evaluate,
    load_template,
    load_templates,
    write_default_template,
)

pytestmark = pytest.mark.unit

CERT_ID = "770c2b3b" + "0" * 56


def template(body: dict[str, Any], name: str = "t") -> Template:
    return Template(name=name, body=body)


def run(body: dict[str, Any], parameters: dict[str, Any] | None = None) -> ProvisioningPlan:
    return evaluate(template(body), parameters or {}, certificate_id=CERT_ID)


def config(value: Any, **extra: Any) -> dict[str, Any]:
    """A template whose DeviceConfiguration.v is `value`, to test intrinsics in isolation."""
    return {"Resources": {}, "DeviceConfiguration": {"v": value}, **extra}


def value_of(expression: Any, parameters: dict[str, Any] | None = None, **extra: Any) -> str:
    return run(config(expression, **extra), parameters).device_configuration["v"]


def rejected(
    body: dict[str, Any],
    parameters: Any = None,
    *,
    certificate_id: str = CERT_ID,
) -> Rejection:
    with pytest.raises(Rejection) as info:
        evaluate(
            template(body), {} if parameters is None else parameters, certificate_id=certificate_id
        )
    assert info.value.status_code == 400
    assert info.value.error_code == "InvalidParameters"
    assert info.value.document()["errorCode"] == "InvalidParameters"
    return info.value


# ------------------------------------------------------------------------------------------------
# broker/rejection.py


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (rejection.invalid_payload, 400, "InvalidPayload"),
        (rejection.invalid_parameters, 400, "InvalidParameters"),
        (rejection.invalid_csr, 400, "InvalidCSR"),
        (rejection.invalid_token, 400, "InvalidCertificateOwnershipToken"),
        (rejection.access_denied, 403, "AccessDenied"),
        (rejection.not_found, 404, "ResourceNotFound"),
        (rejection.conflict, 409, "ResourceConflictsException"),
        (rejection.too_large, 413, "PayloadTooLarge"),
        (rejection.throttled, 429, "Throttling"),
        (rejection.internal, 500, "InternalFailure"),
    ],
)
def test_rejection_constructors_and_document(make: Any, status: int, code: str) -> None:
    error = make("why")
    assert error == Rejection(status, code, "why")
    assert error.document() == {"statusCode": status, "errorCode": code, "errorMessage": "why"}
    assert json.loads(json.dumps(error.document())) == error.document()
    with pytest.raises(Rejection) as info:
        raise error
    assert info.value is error
    assert error.args == (status, code, "why")
    assert str(error) == f"{status} {code}: why"


def test_rejection_survives_pickle_and_copy() -> None:
    error = rejection.invalid_token("Certificate ownership token cannot be empty.")
    assert pickle.loads(pickle.dumps(error)) == error
    assert copy.deepcopy(error) == error


# ------------------------------------------------------------------------------------------------
# Intrinsics


def test_ref_parameter_and_pseudo_parameter() -> None:
    assert value_of({"Ref": "A"}, {"A": "x"}) == "x"
    assert value_of({"Ref": "AWS::IoT::Certificate::Id"}) == CERT_ID


def test_join() -> None:
    assert value_of({"Fn::Join": ["-", ["a", {"Ref": "B"}, "c"]]}, {"B": "b"}) == "a-b-c"
    assert value_of({"Fn::Join": ["", ["a", "b"]]}) == "ab"
    assert value_of({"Fn::Join": [",", []]}) == ""


def test_select_with_int_and_digit_string_index() -> None:
    assert value_of({"Fn::Select": [1, ["a", "b", "c"]]}) == "b"
    assert value_of({"Fn::Select": ["2", ["a", "b", "c"]]}) == "c"
    assert value_of({"Fn::Select": [{"Ref": "I"}, ["a", "b"]]}, {"I": "0"}) == "a"


def test_split_returns_a_list() -> None:
    body = {
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {
                    "ThingName": "t1",
                    "ThingGroups": {"Fn::Split": [",", {"Ref": "Groups"}]},
                },
            }
        }
    }
    plan = run(body, {"Groups": "a,b,c"})
    assert plan.thing is not None
    assert plan.thing.thing_groups == ["a", "b", "c"]


def test_nested_join_of_select_of_split_of_ref() -> None:
    expression = {
        "Fn::Join": [
            "/",
            [
                {"Fn::Select": [0, {"Fn::Split": ["-", {"Ref": "Serial"}]}]},
                {"Fn::Select": ["2", {"Fn::Split": ["-", {"Ref": "Serial"}]}]},
            ],
        ]
    }
    assert value_of(expression, {"Serial": "acme-x-0042"}) == "acme/0042"


def test_sub_with_parameters_variables_pseudo_parameter_and_escape() -> None:
    expression = {
        "Fn::Sub": [
            "${Site}/${Serial}/${Cert}/${!Literal}/${AWS::IoT::Certificate::Id}",
            {
                "Site": {"Fn::Join": ["-", ["eu", {"Ref": "Region"}]]},
                "Cert": "c",
            },
        ]
    }
    got = value_of(expression, {"Serial": "42", "Region": "west"})
    assert got == f"eu-west/42/c/${{Literal}}/{CERT_ID}"
    assert value_of({"Fn::Sub": "dev-${Serial}"}, {"Serial": "7"}) == "dev-7"
    assert value_of({"Fn::Sub": "no variables"}) == "no variables"


def test_find_in_map_with_ref_keys() -> None:
    mappings = {"Sites": {"Seattle": {"Url": "https://example.aws", "Zones": ["a", "b"]}}}
    expression = {"Fn::FindInMap": ["Sites", {"Ref": "Site"}, "Url"]}
    assert value_of(expression, {"Site": "Seattle"}, Mappings=mappings) == "https://example.aws"
    select = {"Fn::Select": [1, {"Fn::FindInMap": ["Sites", "Seattle", "Zones"]}]}
    assert value_of(select, Mappings=mappings) == "b"


def test_defaults_fill_missing_parameters_and_are_reported() -> None:
    body = config(
        {"Fn::Join": [":", [{"Ref": "A"}, {"Ref": "B"}]]},
        Parameters={"A": {"Type": "String"}, "B": {"Type": "String", "Default": "dflt"}},
    )
    plan = run(body, {"A": "a"})
    assert plan.device_configuration == {"v": "a:dflt"}
    assert plan.parameters == {"A": "a", "B": "dflt"}
    assert run(body, {"A": "a", "B": "b"}).device_configuration == {"v": "a:b"}


def test_number_and_comma_delimited_list_parameters() -> None:
    parameters = {
        "N": {"Type": "Number", "Default": 5},
        "L": {"Type": "CommaDelimitedList"},
    }
    body = config({"Fn::Join": ["|", {"Ref": "L"}]}, Parameters=parameters)
    plan = run(body, {"L": "a, b,c"})
    assert plan.device_configuration == {"v": "a|b|c"}
    assert plan.parameters == {"L": "a, b,c", "N": "5"}
    assert run(body, {"L": "x", "N": "-1.5e3"}).parameters["N"] == "-1.5e3"
    error = rejected(body, {"L": "x", "N": "five"})
    assert "N must be a number" in error.error_message


def test_plain_objects_and_lists_are_evaluated_recursively() -> None:
    body = {
        "Resources": {
            "policy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {
                    "PolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [{"Resource": [{"Fn::Sub": "thing/${Serial}"}]}],
                    }
                },
            }
        }
    }
    plan = run(body, {"Serial": "9"})
    assert plan.policies == [
        PolicyPlan(
            logical_id="policy",
            document={"Version": "2012-10-17", "Statement": [{"Resource": ["thing/9"]}]},
        )
    ]


# ------------------------------------------------------------------------------------------------
# Rejections


def test_unresolvable_ref_mirrors_aws_text() -> None:
    error = rejected(config({"Ref": "AWS::Region"}))
    assert error.error_message == "Cannot resolve reference value: AWS::Region"
    assert rejected(config({"Ref": "Nope"})).error_message == (
        "Cannot resolve reference value: Nope"
    )
    assert rejected(config({"Fn::Sub": "${Nope}"})).error_message == (
        "Cannot resolve reference value: Nope"
    )


def test_missing_required_parameter() -> None:
    body = config("x", Parameters={"Serial": {"Type": "String"}})
    assert rejected(body).error_message == "Missing required parameter: Serial"


@pytest.mark.parametrize("value", [1, None, True, ["a"], {"k": "v"}])
def test_parameter_values_must_be_strings(value: Any) -> None:
    assert "Serial must be a string" in rejected(config("x"), {"Serial": value}).error_message


@pytest.mark.parametrize("parameters", [["a"], "a=b", 3])
def test_parameters_must_be_an_object(parameters: Any) -> None:
    assert "parameters must be an object" in rejected(config("x"), parameters).error_message


def test_parameters_cannot_claim_the_pseudo_parameter() -> None:
    body = config({"Ref": "AWS::IoT::Certificate::Id"})
    error = rejected(body, {"AWS::IoT::Certificate::Id": "someone-elses"})
    assert "reserved" in error.error_message


def test_parameter_length_limits() -> None:
    assert "longer than 4096" in rejected(config("x"), {"A": "v" * 4097}).error_message
    assert "at most 2048" in rejected(config("x"), {"A" * 2049: "v"}).error_message


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ({"Fn::Select": [2, ["a", "b"]]}, "index 2 is out of range for a list of 2"),
        ({"Fn::Select": [-1, ["a", "b"]]}, "out of range"),
        ({"Fn::Select": ["one", ["a"]]}, "index must be a non-negative integer"),
        ({"Fn::Select": [1.0, ["a", "b"]]}, "index must be a non-negative integer"),
        ({"Fn::Select": [True, ["a", "b"]]}, "index must be a non-negative integer"),
        ({"Fn::Select": [0, [None]]}, "null"),
        ({"Fn::Select": [0, "abc"]}, "Fn::Select expects [index, [values...]]"),
        ({"Fn::Select": [0]}, "Fn::Select expects"),
    ],
)
def test_select_errors(expression: Any, fragment: str) -> None:
    assert fragment in rejected(config(expression)).error_message


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ({"Fn::FindInMap": ["Nope", "Seattle", "Url"]}, "mapping Nope does not exist"),
        ({"Fn::FindInMap": ["Sites", "Paris", "Url"]}, "mapping Sites has no key Paris"),
        ({"Fn::FindInMap": ["Sites", "Seattle", "Nope"]}, "Sites/Seattle has no key Nope"),
        ({"Fn::FindInMap": ["Sites", "Seattle"]}, "Fn::FindInMap expects"),
        ({"Fn::FindInMap": ["Sites", ["Seattle"], "Url"]}, "Fn::FindInMap expects"),
    ],
)
def test_find_in_map_errors(expression: Any, fragment: str) -> None:
    body = config(expression, Mappings={"Sites": {"Seattle": {"Url": "u"}}})
    assert fragment in rejected(body).error_message


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ({"Fn::Join": "-"}, "Fn::Join expects [delimiter, [values...]]"),
        ({"Fn::Join": ["-", "abc"]}, "Fn::Join expects"),
        ({"Fn::Join": [1, ["a"]]}, "Fn::Join expects"),
        ({"Fn::Join": ["-", ["a", ["b"]]]}, "every value to join must be a string"),
        ({"Fn::Split": [",", ["a"]]}, "Fn::Split expects"),
        ({"Fn::Split": ["", "abc"]}, "non-empty delimiter"),
        ({"Fn::Split": ","}, "Fn::Split expects"),
        ({"Fn::Sub": 5}, "Fn::Sub expects"),
        ({"Fn::Sub": ["${A}", "not-an-object"]}, "Fn::Sub expects"),
        ({"Fn::Sub": ["${A}", {"A": ["x"]}]}, "${A} must be a string"),
        ({"Fn::Sub": ["${A}", {}, {}]}, "Fn::Sub expects"),
        ({"Ref": ["A"]}, "Ref in DeviceConfiguration must name a parameter"),
        ({"Fn::GetAtt": ["thing", "Arn"]}, "Unsupported intrinsic function Fn::GetAtt"),
    ],
)
def test_intrinsic_shape_errors(expression: Any, fragment: str) -> None:
    assert fragment in rejected(config(expression)).error_message


def test_a_list_where_a_string_is_needed() -> None:
    error = rejected(config({"Fn::Split": [",", "a,b"]}))
    assert "DeviceConfiguration.v must evaluate to a string, not a list" in error.error_message


def test_device_configuration_must_be_flat() -> None:
    error = rejected(config({"nested": "object"}))
    assert "nested objects are not supported" in error.error_message
    assert "not a list" in rejected(config(["a"])).error_message
    assert "not int" in rejected(config(30)).error_message


def thing_body(name: Any, **properties: Any) -> dict[str, Any]:
    return {
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": name, **properties}}
        }
    }


@pytest.mark.parametrize("name", ["has space", "a/b", "x" * 129, "", "dévice", "a.b", "a+b"])
def test_thing_name_must_match_pattern(name: str) -> None:
    error = rejected(thing_body({"Ref": "Name"}), {"Name": name})
    assert "ThingName must be 1-128 characters" in error.error_message
    assert name not in error.error_message or name == ""


def test_thing_name_accepts_the_full_alphabet() -> None:
    name = "Ab9:_-" + "x" * 122
    plan = run(thing_body({"Ref": "Name"}), {"Name": name})
    assert plan.thing is not None
    assert plan.thing.name == name


def test_thing_name_required_and_properties_typed() -> None:
    body = {"Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {}}}}
    assert "ThingName is required" in rejected(body).error_message
    assert "must be a string" in rejected(thing_body(["a"])).error_message
    body = thing_body("t", AttributePayload={"a": {"nested": "x"}})
    assert "AttributePayload.a must be a string" in rejected(body).error_message
    assert "ThingGroups must be a list" in rejected(thing_body("t", ThingGroups="g")).error_message
    assert (
        "ThingTypeName must be a string" in rejected(thing_body("t", ThingTypeName=1)).error_message
    )


def cert_body(**properties: Any) -> dict[str, Any]:
    return {"Resources": {"cert": {"Type": "AWS::IoT::Certificate", "Properties": properties}}}


def test_certificate_id_must_be_the_token_certificate() -> None:
    message = "CertificateId must be the certificate of the ownership token"
    assert rejected(cert_body(CertificateId="other")).error_message == message
    assert rejected(cert_body()).error_message == message
    body = cert_body(CertificateId={"Ref": "Id"})
    assert rejected(body, {"Id": "f" * 64}).error_message == message
    assert run(body, {"Id": CERT_ID}).certificate == CertificatePlan(CERT_ID)


def test_certificate_status_case_insensitive_and_validated() -> None:
    ref = {"Ref": "AWS::IoT::Certificate::Id"}
    assert run(cert_body(CertificateId=ref)).certificate == CertificatePlan(CERT_ID, "ACTIVE")
    for status, expected in [
        ("Active", "ACTIVE"),
        ("inactive", "INACTIVE"),
        ("INACTIVE", "INACTIVE"),
    ]:
        plan = run(cert_body(CertificateId=ref, Status=status))
        assert plan.certificate is not None
        assert plan.certificate.status == expected
    assert (
        "Status must be ACTIVE or INACTIVE"
        in rejected(cert_body(CertificateId=ref, Status="PENDING_ACTIVATION")).error_message
    )


def test_certificate_from_csr_or_pem_is_not_fleet_provisioning() -> None:
    body = cert_body(CertificateSigningRequest={"Ref": "CSR"})
    assert "only CertificateId" in rejected(body, {"CSR": "x"}).error_message


def test_policy_needs_exactly_one_of_name_or_document() -> None:
    def body(**properties: Any) -> dict[str, Any]:
        return {"Resources": {"p": {"Type": "AWS::IoT::Policy", "Properties": properties}}}

    assert "exactly one" in rejected(body()).error_message
    assert "exactly one" in rejected(body(PolicyName="a", PolicyDocument={})).error_message
    assert "not valid JSON" in rejected(body(PolicyDocument="{nope")).error_message
    assert "must be a JSON object" in rejected(body(PolicyDocument="[]")).error_message
    plan = run(body(PolicyDocument='{"Version": "2012-10-17"}'))
    assert plan.policies == [PolicyPlan("p", document={"Version": "2012-10-17"})]


def test_invalid_template_built_in_code_is_rejected_not_crashing() -> None:
    error = rejected({"Resources": {"x": {"Type": "AWS::S3::Bucket"}}})
    assert "Template t is invalid" in error.error_message


def test_error_messages_do_not_echo_parameter_values() -> None:
    secret = "tok-" + "s" * 40
    for body in (thing_body({"Ref": "Name"}), cert_body(CertificateId={"Ref": "Name"})):
        error = rejected(body, {"Name": secret + " x"})
        assert secret not in json.dumps(error.document())


# ------------------------------------------------------------------------------------------------
# Whole templates


def test_default_template_end_to_end() -> None:
    plan = evaluate(
        Template(DEFAULT_TEMPLATE_NAME, copy.deepcopy(DEFAULT_TEMPLATE)),
        {"SerialNumber": "SN0042"},
        certificate_id=CERT_ID,
    )
    assert plan == ProvisioningPlan(
        thing=ThingPlan(
            name="generic-SN0042",
            attributes={"model": "generic", "serial": "SN0042"},
            thing_groups=["fleet"],
            thing_type=None,
            overrides={
                "AttributePayload": "MERGE",
                "ThingGroups": "DO_NOTHING",
                "ThingTypeName": "REPLACE",
            },
        ),
        certificate=CertificatePlan(certificate_id=CERT_ID, status="ACTIVE"),
        policies=[PolicyPlan(logical_id="policy", name="fleet-device")],
        device_configuration={"shadowSyncSeconds": "30"},
        parameters={"SerialNumber": "SN0042", "DeviceModel": "generic"},
    )
    plan = evaluate(
        Template(DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE),
        {"SerialNumber": "7", "DeviceModel": "sensor"},
        certificate_id=CERT_ID,
    )
    assert plan.thing is not None
    assert plan.thing.name == "sensor-7"
    error = rejected(DEFAULT_TEMPLATE)
    assert error.error_message == "Missing required parameter: SerialNumber"


def test_write_default_template_then_load(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    path = write_default_template(folder)
    assert path == folder / "fleet-default.json"
    assert json.loads(path.read_text()) == DEFAULT_TEMPLATE
    loaded = load_templates(folder)
    assert list(loaded) == [DEFAULT_TEMPLATE_NAME]
    assert loaded[DEFAULT_TEMPLATE_NAME].body == DEFAULT_TEMPLATE
    assert loaded[DEFAULT_TEMPLATE_NAME].description.startswith("Default fleet template")
    assert [p.name for p in folder.iterdir()] == ["fleet-default.json"]  # no temp file left


def test_write_default_template_keeps_an_edited_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet-default.json"
    path.write_text('{"Resources": {}}')
    assert write_default_template(tmp_path) == path
    assert path.read_text() == '{"Resources": {}}'


AWS_SAMPLE: dict[str, Any] = {
    "Parameters": {
        "ThingName": {"Type": "String"},
        "SerialNumber": {"Type": "String"},
        "Location": {"Type": "String", "Default": "WA"},
        "DeviceLocation": {"Type": "String"},
    },
    "Mappings": {"LocationTable": {"Seattle": {"LocationUrl": "https://example.aws"}}},
    "Resources": {
        "thing": {
            "Type": "AWS::IoT::Thing",
            "Properties": {
                "ThingName": {"Ref": "ThingName"},
                "AttributePayload": {"version": "v1", "serialNumber": {"Ref": "SerialNumber"}},
                "ThingTypeName": "lightBulb-versionA",
                "ThingGroups": ["v1-lightbulbs", {"Ref": "Location"}],
                "BillingGroup": "LightBulbBillingGroup",
            },
            "OverrideSettings": {
                "AttributePayload": "MERGE",
                "ThingTypeName": "REPLACE",
                "ThingGroups": "DO_NOTHING",
            },
        },
        "certificate": {
            "Type": "AWS::IoT::Certificate",
            "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                "Status": "Active",
            },
            "OverrideSettings": {"Status": "REPLACE"},
        },
        "policy": {
            "Type": "AWS::IoT::Policy",
            "Properties": {
                "PolicyDocument": '{ "Version": "2012-10-17", "Statement": [{ "Effect": "Allow",'
                ' "Action":["iot:Publish"], "Resource": '
                '["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"] }] }'
            },
        },
    },
    "DeviceConfiguration": {
        "FallbackUrl": "https://www.example.com/test-site",
        "LocationUrl": {
            "Fn::FindInMap": ["LocationTable", {"Ref": "DeviceLocation"}, "LocationUrl"]
        },
    },
}


def test_aws_docs_sample_template(tmp_path: Path) -> None:
    path = tmp_path / "lightbulbs.json"
    path.write_text(json.dumps(AWS_SAMPLE, indent=4))
    loaded = load_template(path)
    assert loaded.name == "lightbulbs"
    parameters = {"ThingName": "bulb-1", "SerialNumber": "123", "DeviceLocation": "Seattle"}
    plan = evaluate(loaded, parameters, certificate_id=CERT_ID)
    assert plan.thing == ThingPlan(
        name="bulb-1",
        attributes={"version": "v1", "serialNumber": "123"},
        thing_groups=["v1-lightbulbs", "WA"],
        thing_type="lightBulb-versionA",
        billing_group="LightBulbBillingGroup",
        overrides={
            "AttributePayload": "MERGE",
            "ThingTypeName": "REPLACE",
            "ThingGroups": "DO_NOTHING",
        },
    )
    assert plan.certificate == CertificatePlan(CERT_ID, "ACTIVE", {"Status": "REPLACE"})
    assert len(plan.policies) == 1
    assert plan.policies[0].name is None
    assert plan.policies[0].document is not None
    assert plan.policies[0].document["Statement"][0]["Action"] == ["iot:Publish"]
    assert plan.device_configuration == {
        "FallbackUrl": "https://www.example.com/test-site",
        "LocationUrl": "https://example.aws",
    }
    assert plan.parameters == {**parameters, "Location": "WA"}
    error = rejected(AWS_SAMPLE, {**parameters, "DeviceLocation": "Paris"})
    assert "LocationTable has no key Paris" in error.error_message


def test_upper_snake_override_keys_from_the_docs_are_normalised() -> None:
    body = thing_body("t")
    body["Resources"]["thing"]["OverrideSettings"] = {"ATTRIBUTE_PAYLOAD": "MERGE"}
    plan = run(body)
    assert plan.thing is not None
    assert plan.thing.overrides == {"AttributePayload": "MERGE"}


def test_empty_template_gives_empty_plan() -> None:
    assert run({"Resources": {}}) == ProvisioningPlan(None, None, [], {}, {})


# ------------------------------------------------------------------------------------------------
# Loading


def write(folder: Path, name: str, body: Any) -> Path:
    path = folder / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def load_error(path: Path) -> TemplateLoadError:
    with pytest.raises(TemplateLoadError) as info:
        load_template(path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    return info.value


def test_load_templates_skips_hook_files_and_non_json(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {"Resources": {}})
    write(tmp_path, "b_2-x.json", {"Resources": {}, "Description": "second"})
    write(tmp_path, "a.hook.json", {"anything": "teammate's format"})
    write(tmp_path, "notes.txt", "not a template")
    (tmp_path / "sub.json").mkdir()
    loaded = load_templates(tmp_path)
    assert sorted(loaded) == ["a", "b_2-x"]
    assert loaded["b_2-x"].description == "second"
    assert loaded["a"].description == ""


def test_load_templates_raises_for_a_bad_file(tmp_path: Path) -> None:
    write(tmp_path, "good.json", {"Resources": {}})
    bad = write(tmp_path, "bad.json", "{")
    with pytest.raises(TemplateLoadError) as info:
        load_templates(tmp_path)
    assert info.value.path == bad


def test_bad_json(tmp_path: Path) -> None:
    error = load_error(write(tmp_path, "t.json", '{"Resources": {},}'))
    assert error.reason.startswith("invalid JSON") and "line 1" in error.reason
    assert load_error(write(tmp_path, "u.json", "")).reason.startswith("invalid JSON")
    path = tmp_path / "v.json"
    path.write_bytes(b'{"Resources": {"\xff": 1}}')
    assert "UTF-8" in load_error(path).reason


def test_too_large(tmp_path: Path) -> None:
    body = {"Resources": {}, "Description": "x" * 10240}
    assert "more than 10240" in load_error(write(tmp_path, "big.json", body)).reason
    fits = {"Resources": {}, "Description": ""}
    fits["Description"] = "x" * (10240 - len(json.dumps(fits)))
    assert load_template(write(tmp_path, "fits.json", fits)).name == "fits"


@pytest.mark.parametrize("name", ["has space.json", "x" * 37 + ".json", "dot.ted.json", ".json"])
def test_bad_name(tmp_path: Path, name: str) -> None:
    assert "template name" in load_error(write(tmp_path, name, {"Resources": {}})).reason


def test_name_of_36_characters_is_fine(tmp_path: Path) -> None:
    assert load_template(write(tmp_path, "x" * 36 + ".json", {"Resources": {}})).name == "x" * 36


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "must be a JSON object"),
        ({}, "Resources is missing"),
        ({"Resources": []}, "Resources must be an object"),
        ({"Resources": {"x": {"Type": "AWS::S3::Bucket"}}}, "Type must be one of"),
        ({"Resources": {"x": {}}}, "Type must be one of"),
        ({"Resources": {"x": "thing"}}, "resource 'x' must be an object"),
        (
            {"Resources": {"x": {"Type": "AWS::IoT::Thing", "Properties": []}}},
            "Properties must be an object",
        ),
        (
            {
                "Resources": {
                    "a": {"Type": "AWS::IoT::Thing"},
                    "b": {"Type": "AWS::IoT::Thing"},
                }
            },
            "only one AWS::IoT::Thing",
        ),
        (
            {"Resources": {"p": {"Type": "AWS::IoT::Policy", "OverrideSettings": {"X": "FAIL"}}}},
            "OverrideSettings are not available for AWS::IoT::Policy",
        ),
        (
            {
                "Resources": {
                    "c": {"Type": "AWS::IoT::Certificate", "OverrideSettings": {"Status": "MERGE"}}
                }
            },
            "OverrideSettings.Status must be one of DO_NOTHING, REPLACE, FAIL",
        ),
        (
            {"Resources": {"t": {"Type": "AWS::IoT::Thing", "OverrideSettings": {"Nope": "FAIL"}}}},
            "OverrideSettings.Nope is not settable",
        ),
        ({"Resources": {}, "Parameters": {"A": {"Type": "Integer"}}}, "Type must be one of"),
        ({"Resources": {}, "Parameters": {"A": {"Type": "String", "Default": []}}}, "Default"),
        ({"Resources": {}, "Parameters": {"AWS::X": {"Type": "String"}}}, "reserved"),
        ({"Resources": {}, "Mappings": {"M": {"k": {"v": {"Ref": "A"}}}}}, "no functions"),
        ({"Resources": {}, "Mappings": {"M": ["x"]}}, "mapping 'M' must be an object"),
        ({"Resources": {}, "DeviceConfiguration": ["a"]}, "DeviceConfiguration must be"),
        ({"Resources": {}, "Description": 3}, "Description must be a string"),
    ],
)
def test_structural_errors(tmp_path: Path, body: Any, fragment: str) -> None:
    assert fragment in load_error(write(tmp_path, "t.json", body)).reason


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    deep: Any = "x"
    for _ in range(100):
        deep = [deep]
    error = load_error(write(tmp_path, "t.json", {"Resources": {}, "DeviceConfiguration": deep}))
    assert "deeper than" in error.reason

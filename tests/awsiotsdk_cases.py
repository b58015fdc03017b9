"""AWS's own device SDK (awsiotsdk, V2 request-response clients) against our broker side:
an independent client checks the wire contract.

Not collected by the suite's own pass (no test_ prefix): tests/test_interop_awsiotsdk.py runs
this file in a pytest process of its own, so that a crash inside the SDK's native code
(awscrt segfaulted once during TLS setup, in one of four full runs) fails one test with its
output instead of killing the whole suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import awsiot
import pytest
from awscrt import mqtt5, mqtt_request_response
from awsiot import V2ServiceException, iotidentity, iotshadow, mqtt5_client_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fleet import Fleet, running_fleet

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with running_fleet(services=True) as running:
        yield running


@pytest.fixture
def claim_client(fleet: Fleet) -> Iterator[mqtt5.Client]:
    connected = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint="localhost",
        port=fleet.config.port,
        ca_filepath=str(fleet.pki.ca_cert),
        cert_filepath=str(fleet.pki.claim_cert),
        pri_key_filepath=str(fleet.pki.claim_key),
        client_id="claim-aws-sdk",
        enable_metrics_collection=False,
        on_lifecycle_connection_success=lambda _event: connected.set(),
    )
    client.start()
    assert connected.wait(10), "the AWS SDK could not connect over mutual TLS"
    yield client
    client.stop()


def identity(client: mqtt5.Client) -> iotidentity.IotIdentityClientV2:
    options = mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=4,
        max_streaming_subscriptions=2,
        operation_timeout_in_seconds=10,
    )
    return iotidentity.IotIdentityClientV2(client, options)


def test_sdk_provisions_by_csr_and_registers_a_thing(claim_client: mqtt5.Client) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdk-device")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    client = identity(claim_client)
    created = client.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)
    ).result(10)
    assert len(created.certificate_id) == 64
    assert created.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
    registered = client.register_thing(
        iotidentity.RegisterThingRequest(
            template_name="fleet-default",
            certificate_ownership_token=created.certificate_ownership_token,
            parameters={"SerialNumber": "SDK-1", "DeviceModel": "awssdk"},
        )
    ).result(10)
    assert registered.thing_name == "awssdk-SDK-1"
    assert registered.device_configuration == {"shadowSyncSeconds": "30"}


def test_sdk_parses_a_rejection(claim_client: mqtt5.Client) -> None:
    client = identity(claim_client)
    future = client.register_thing(
        iotidentity.RegisterThingRequest(
            template_name="fleet-default",
            certificate_ownership_token="not-a-real-token",
            parameters={"SerialNumber": "SDK-2"},
        )
    )
    with pytest.raises(awsiot.V2ServiceException) as failure:
        future.result(10)
    error = failure.value.modeled_error
    assert error.status_code == 400
    assert error.error_code == "InvalidCertificateOwnershipToken"


def test_aws_sdk_shadow_client_against_our_service(fleet: Fleet) -> None:
    creds = fleet.device("sdk-thing")
    connected = [False]
    client = mqtt5_client_builder.mtls_from_path(
        endpoint="localhost",
        port=fleet.config.port,
        ca_filepath=str(fleet.pki.ca_cert),
        cert_filepath=str(creds.cert),
        pri_key_filepath=str(creds.key),
        client_id="sdk-thing",
        enable_metrics_collection=False,
        on_lifecycle_connection_success=lambda _e: connected.__setitem__(0, True),
    )
    client.start()
    try:
        deadline = time.monotonic() + 10
        while not connected[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connected[0]
        shadow = iotshadow.IotShadowClientV2(
            client, mqtt_request_response.ClientOptions(4, 2, operation_timeout_in_seconds=10)
        )
        with pytest.raises(V2ServiceException) as missing:
            shadow.get_shadow(iotshadow.GetShadowRequest(thing_name="sdk-thing")).result(10)
        assert missing.value.modeled_error.code == 404
        deltas: list[iotshadow.ShadowDeltaUpdatedEvent] = []
        stream = shadow.create_shadow_delta_updated_stream(
            iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name="sdk-thing"),
            _stream_options(deltas),
        )
        stream.open()
        time.sleep(0.5)
        updated = shadow.update_shadow(
            iotshadow.UpdateShadowRequest(
                thing_name="sdk-thing",
                state=iotshadow.ShadowState(desired={"color": "red"}, reported={"color": "blue"}),
            )
        ).result(10)
        assert updated.version == 1
        got = shadow.get_shadow(iotshadow.GetShadowRequest(thing_name="sdk-thing")).result(10)
        assert got.state.delta == {"color": "red"}
        deadline = time.monotonic() + 5
        while not deltas and time.monotonic() < deadline:
            time.sleep(0.05)
        assert deltas and deltas[0].state == {"color": "red"}
        deleted = shadow.delete_shadow(
            iotshadow.DeleteShadowRequest(thing_name="sdk-thing")
        ).result(10)
        assert deleted.version == 1
    finally:
        client.stop()


def _stream_options(sink: list) -> object:
    import awsiot

    return awsiot.ServiceStreamOptions(incoming_event_listener=sink.append)

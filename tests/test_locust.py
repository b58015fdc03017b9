"""`fleet-sim locust`: Locust users are virtual devices running the agent's claim flow and shadow
logic over the paho transport, against a real broker side (Mosquitto + plugin + services, a
throw-away PKI). Headless, --processes, master + two workers on loopback, bad options and
AWS rejections reported as failures."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import wire
from broker.mosquitto import free_port
from broker.registry import CertificateRole
from tests.fleet import AGENT_ENV, REPO, Fleet, make_workdir, running_fleet

pytestmark = pytest.mark.commands

#: Every row the fleet's Locust statistics have once a run is under way.
STEPS = {
    ("connect", "claim"),
    ("sub", "claim"),
    ("claim", "CreateCertificateFromCsr"),
    ("claim", "RegisterThing"),
    ("connect", "thing"),
    ("sub", "thing"),
    ("device", "onboarding"),
    ("shadow", "update"),
    ("shadow", "get"),
    ("shadow", "desired -> delta"),
    ("shadow", "delta -> reported"),
}
PACE = ["--fleet-update-interval", "0.3"]


@pytest.fixture(scope="module")
def stack() -> Iterator[Fleet]:
    with running_fleet(services=True) as running:
        yield running


def device_options(stack: Fleet) -> list[str]:
    return [
        *("--host", f"mqtts://127.0.0.1:{stack.config.port}"),
        *("--fleet-ca", str(stack.pki.ca_cert)),
        *("--fleet-claim-cert", str(stack.pki.claim_cert)),
        *("--fleet-claim-key", str(stack.pki.claim_key)),
    ]


def fleet_locust(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``fleet-sim locust <args>`` (the wrapper module) as a real subprocess, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "simulator.locust_command", *args],
        cwd=REPO,
        env=AGENT_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def locust_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "simulator.locust_command", *args],
        cwd=REPO,
        env=AGENT_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stats(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def count(rows: dict[tuple[str, str], dict[str, str]], step: tuple[str, str]) -> int:
    return int(rows[step]["Request Count"]) if step in rows else 0


def things_with(stack: Fleet, prefix: str) -> list[str]:
    with stack.registry() as registry:
        return [t.name for t in registry.list_things() if f"-{prefix}-" in t.name]


def assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_headless_run_reports_every_step_in_csv_and_html(stack: Fleet) -> None:
    out = make_workdir()
    users = 12
    proc = fleet_locust(
        *("--headless", "-u", str(users), "-r", str(users), "-t", "6s"),
        *("--csv", str(out / "run"), "--html", str(out / "report.html")),
        *device_options(stack),
        *PACE,
        "--fleet-serial-prefix",
        "headless",
    )
    assert_clean(proc)
    rows = stats(out / "run")
    for step in STEPS:
        assert count(rows, step) > 0, (step, sorted(rows))
        assert rows[step]["Failure Count"] == "0", rows[step]
    # One claim flow per user, each onboarded once; nothing else failed anywhere.
    for step in [s for s in STEPS if s[0] in ("claim", "device")]:
        assert count(rows, step) == users, step
    assert len(things_with(stack, "headless")) == users
    assert rows[("", "Aggregated")]["Failure Count"] == "0"
    report = (out / "report.html").read_text()
    for name in ("CreateCertificateFromCsr", "RegisterThing", "onboarding", "delta -"):
        assert name in report, name


def test_processes_share_one_run(stack: Fleet) -> None:
    out = make_workdir()
    proc = fleet_locust(
        *("--headless", "--processes", "2", "-u", "8", "-r", "8", "-t", "5s"),
        *("--csv", str(out / "run")),
        *device_options(stack),
        *PACE,
    )
    assert_clean(proc)
    rows = stats(out / "run")
    assert count(rows, ("claim", "RegisterThing")) == 8
    assert count(rows, ("shadow", "update")) > 0
    assert rows[("", "Aggregated")]["Failure Count"] == "0"


def test_master_and_two_workers_on_loopback(stack: Fleet) -> None:
    """The master alone gets the broker and the device files and forwards them; each worker
    names its own devices, so the registry tells which worker onboarded whom."""
    out = make_workdir()
    port = str(free_port())
    workers = [
        locust_process(
            *("--worker", "--master-host", "127.0.0.1", "--master-port", port),
            *("--fleet-serial-prefix", name),
        )
        for name in ("wone", "wtwo")
    ]
    try:
        master = fleet_locust(
            *("--master", "--headless", "--expect-workers", "2"),
            *("--master-bind-host", "127.0.0.1", "--master-bind-port", port),
            *("-u", "10", "-r", "10", "-t", "6s", "--csv", str(out / "run")),
            *device_options(stack),
            *PACE,
        )
        outputs = [worker.communicate(timeout=30)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert_clean(master)
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    rows = stats(out / "run")
    onboarded = {name: len(things_with(stack, name)) for name in ("wone", "wtwo")}
    assert all(onboarded.values()), onboarded  # both workers ran devices...
    # ...and the master's figures hold both workers' devices.
    assert count(rows, ("claim", "RegisterThing")) == sum(onboarded.values()) == 10
    assert count(rows, ("device", "onboarding")) == 10
    assert count(rows, ("shadow", "update")) > 0
    assert rows[("", "Aggregated")]["Failure Count"] == "0"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--fleet-ca", None], "--fleet-ca is required"),
        (["--host", "http://127.0.0.1:1"], "mqtts://HOST:PORT"),
        (["--fleet-claim-key", "/no/such/claim.key"], "cannot read /no/such/claim.key"),
        (["--fleet-claim-key", "CA"], "cannot use the certificate"),
        (["--fleet-update-interval", "soon"], "'soon' is not a number"),
    ],
)
def test_bad_options_are_one_clear_line(
    stack: Fleet, change: list[str | None], message: str
) -> None:
    options = device_options(stack)
    flag, value = change
    if value is None:
        at = options.index(flag)
        del options[at : at + 2]
    elif flag in options:
        options[options.index(flag) + 1] = str(stack.pki.ca_cert) if value == "CA" else value
    else:
        options += [flag, value]
    proc = fleet_locust("--headless", "-u", "1", "-t", "2s", *options, timeout=30)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "PRIVATE KEY" not in proc.stdout + proc.stderr


def test_a_rejection_is_a_failure_named_by_its_aws_error_code(stack: Fleet) -> None:
    out = make_workdir()
    proc = fleet_locust(
        *("--headless", "-u", "3", "-r", "3", "-t", "3s", "--csv", str(out / "run")),
        *device_options(stack),
        *("--fleet-template", "no-such-template"),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # Locust: the run had failures
    assert "Traceback" not in proc.stdout + proc.stderr
    rows = stats(out / "run")
    assert rows[("claim", "CreateCertificateFromCsr")]["Failure Count"] == "0"
    register = rows[("claim", "RegisterThing")]
    assert int(register["Failure Count"]) == int(register["Request Count"]) > 0
    with open(out / "run_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert [(row["Method"], row["Name"]) for row in failures] == [("claim", "RegisterThing")]
    assert failures[0]["Error"].startswith("AwsRejected('ResourceNotFound (404): ")


def test_a_refused_connection_is_a_failure_with_its_reason(stack: Fleet) -> None:
    unknown = stack.identity(CertificateRole.CLAIM, register=False)  # CA-signed, not registered
    out = make_workdir()
    options = device_options(stack)
    options[options.index("--fleet-claim-cert") + 1] = str(unknown.cert)
    options[options.index("--fleet-claim-key") + 1] = str(unknown.key)
    proc = fleet_locust(
        *("--headless", "-u", "2", "-r", "2", "-t", "2s", "--csv", str(out / "run")), *options
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    with open(out / "run_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert [(row["Method"], row["Name"]) for row in failures] == [("connect", "claim")]
    assert "refused the connection: Not authorized (0x87)" in failures[0]["Error"]


def test_help_lists_the_fleet_options() -> None:
    proc = fleet_locust("--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--headless", "--fleet-ca", "--fleet-claim-key", "--fleet-update-interval"):
        assert flag in proc.stdout, flag
    # Ours first: what this is, its own options, then Locust's help.
    assert proc.stdout.startswith("fleet-sim locust: fleet-sim's wrapper around Locust")
    ours = proc.stdout[: proc.stdout.index("Usage: locust")]
    assert "--local" in ours and "--keep" in ours and "exit codes" in ours


@pytest.mark.unit
def test_request_types_fit_locusts_console_table() -> None:
    from locust.stats import STATS_TYPE_WIDTH

    assert all(len(kind) <= STATS_TYPE_WIDTH for kind, _ in STEPS), STEPS


def test_keep_applies_only_with_local() -> None:
    proc = fleet_locust("--keep", "--headless", "-t", "1s", timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fleet-sim: error: --keep applies only with --local"


def kept_folder(output: str) -> Path:
    found = re.search(r"kept the broker side's folder (\S+) \(logs: (\S+),", output)
    assert found, output[-3000:]
    folder, log = Path(found.group(1)), Path(found.group(2))
    assert folder.is_dir() and log.is_file() and log.is_relative_to(folder)
    return folder


def test_local_starts_its_own_broker_side() -> None:
    out = make_workdir()
    proc = fleet_locust(
        *("--local", "--headless", "-u", "3", "-r", "3", "-t", "3s", "--csv", str(out / "run")),
        *PACE,
    )
    assert_clean(proc)
    assert "local broker side on 127.0.0.1:" in proc.stdout
    rows = stats(out / "run")
    assert count(rows, ("device", "onboarding")) == 3
    assert count(rows, ("shadow", "update")) > 0
    assert rows[("", "Aggregated")]["Failure Count"] == "0"
    # A run that went well leaves no folder behind.
    found = re.search(r"local broker side on 127\.0\.0\.1:\d+ \((\S+)\)", proc.stdout)
    assert found and not Path(found.group(1)).exists()
    assert "kept" not in proc.stdout


@pytest.mark.parametrize(
    ("options", "why"),
    [(["--keep"], ""), (["--fleet-template", "no-such-template"], "the run failed; ")],
    ids=["asked", "failed"],
)
def test_local_keeps_its_folder_when_asked_or_when_the_run_failed(
    options: list[str], why: str
) -> None:
    proc = fleet_locust("--local", "--headless", "-u", "1", "-r", "1", "-t", "2s", *options)
    try:
        assert proc.returncode == (1 if why else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"fleet-sim: {why}kept the broker side's folder" in proc.stdout
        assert (kept_folder(proc.stdout) / "certs" / "ca.pem").is_file()
    finally:
        for folder in re.findall(r"kept the broker side's folder (\S+) ", proc.stdout):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.stack
@pytest.mark.parametrize("after", ["hello", "connect"])
def test_the_locust_transport_takes_a_reset_as_transient_too(after: str) -> None:
    """The gevent transport maps a failed handshake with the agent's own function: a reset
    without an alert is no refusal of the certificate (it had its own copy that said so)."""
    from agent.runtime import classify
    from agent.session import ConnectionLost, TlsFailure, tls_context
    from simulator.locust_transport import Connection
    from tests.test_agent_session import ResettingServer

    with running_fleet(services=False) as fleet:
        server = ResettingServer(fleet, after)
        context = tls_context(fleet.pki.ca_cert, fleet.claim.cert, fleet.claim.key)
        with pytest.raises((TlsFailure, ConnectionLost)) as raised:
            Connection.open("127.0.0.1", server.port, client_id="x", context=context, timeout=5)
        server.thread.join(5)
    assert not getattr(raised.value, "peer_refused", False), raised.value
    assert classify(raised.value) == "transient", raised.value


def test_the_locust_user_reports_with_optimistic_locking_and_resolves_conflicts(
    stack: Fleet,
) -> None:
    """Each user's reports carry the shadow version, as the agent's do (agent.shadow.
    after_report). An operator changing every thing's desired state every 20 ms makes
    those versions go stale under them: each conflict is a counted "version conflict",
    resolved by a get and a resend, never a failure."""
    out = make_workdir()
    users = 8
    operator = stack.client(stack.service, "operator-locking")
    stop = threading.Event()

    def desire_all_the_time() -> None:
        n = 0
        while not stop.wait(0.02):
            n += 1
            for thing in things_with(stack, "locking"):
                body = json.dumps({"state": {"desired": {"op": n}}})
                operator.paho.publish(wire.shadow_topic(thing, "update"), body, qos=0)

    churn = threading.Thread(target=desire_all_the_time, daemon=True)
    churn.start()
    try:
        proc = fleet_locust(
            *("--headless", "-u", str(users), "-r", str(users), "-t", "8s"),
            *("--csv", str(out / "run")),
            *device_options(stack),
            *("--fleet-update-interval", "0.05"),
            *("--fleet-serial-prefix", "locking"),
        )
    finally:
        stop.set()
        churn.join(5)
    assert_clean(proc)
    rows = stats(out / "run")
    assert rows[("", "Aggregated")]["Failure Count"] == "0", rows
    conflicts = count(rows, ("shadow", "version conflict"))
    print(f"{conflicts} version conflicts resolved in {count(rows, ('shadow', 'update'))} updates")
    assert conflicts > 0

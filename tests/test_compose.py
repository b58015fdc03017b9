"""docker-compose.yml without a container engine: what can be proven here, is.

- The file parses, and every service runs a real command of ours with options our own argparse
  parsers (and Locust's, with the locustfile's options) accept.
- Every mounted or copied path exists in the repository; the Dockerfiles send only what they
  install; the Mosquitto config of the broker container is the one `fleet-broker up` renders.
- Least privilege: only the services that sign or revoke mount what holds the CA key; the
  broker mounts no private key but its own; no container runs as root, and every named volume
  is owned (by its mount point in the image) so that its users can use it.
- The same command lines, run natively against a real Mosquitto with the plugin (container
  paths mapped to a temp folder, the `broker` host name to localhost, port 8883 to a free
  one), do what the stack is for: init -> broker and services up (their health checks pass)
  -> the agent provisions and syncs -> the demo passes every check, as scripts/demo does,
  with that agent -> a revocation's CRL reaches the broker's view -> the measured simulator
  run completes. Run as root, each command runs as its container's user (uid:gid), in volume
  folders owned as the images' mount points are, so the file modes are proven too.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from agent.cli import build_parser as agent_parser
from broker import bootstrap
from broker.cli import build_parser as broker_parser
from broker.config import load_config
from broker.mosquitto import RunFiles, prepare_run_dir, render_conf
from broker.pki import PkiPaths
from broker.policy import render as render_policy
from simulator.cli import build_parser as sim_parser
from simulator.cli import demo_problem
from simulator.scenario import Scenario, validate
from tests.fleet import REPO, free_port, make_workdir
from tests.test_demo import CHECKS as DEMO_CHECKS

pytestmark = pytest.mark.commands

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPOSE = REPO / "docker-compose.yml"
BROKER_CONF = REPO / "docker" / "mosquitto" / "mosquitto.conf"
FLEET_SERVICES = {"init", "broker", "services", "agent", "demo"}
MEASURE_SERVICES = {"simulator"}
LOCUST_SERVICES = {"locust-master", "locust-worker"}
PROFILES = {"measure": MEASURE_SERVICES, "locust": LOCUST_SERVICES}
BROKER_HOST, BROKER_PORT = "broker", 8883
# Who may hold the CA key and the service identity's key: init makes them, the services sign
# devices' CSRs with the CA key, the demo is the operator (it revokes a device, which takes the
# CA key for the CRL, and changes desired state as the service identity).
SIGNERS = {"init", "services", "demo"}
SECRET_FILES = ("ca_key", "service_key", "claim_key")  # PkiPaths attributes
# What the broker container reads, by its Mosquitto directive: copies of these broker side
# files (PkiPaths attributes) made by the init service. (The CRL's copy, which the services
# renew after a revocation, is checked on its own.)
BROKER_COPIES = {"cafile": "ca_cert", "certfile": "broker_cert", "keyfile": "broker_key"}


# ------------------------------------------------------------------- the compose file, parsed


def _as_strings(value: Any) -> Any:
    """Compose reads scalars as strings (ports, numbers in commands): compare them so."""
    if isinstance(value, dict):
        return {str(k): _as_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_strings(v) for v in value]
    return None if value is None else str(value)


def load_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict), "docker-compose.yml is not a mapping"
    return _as_strings(document)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    return {name: list(service["command"]) for name, service in compose["services"].items()}


# ------------------------------------------------------------------------- the Dockerfiles


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str
    stage: str | None  # --from=<stage>


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                instructions.append((word.upper(), rest.strip()))
            current = ""
    return instructions


def dockerfile_copies(path: Path) -> list[Copy]:
    copies = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction in ("COPY", "ADD"):
            words = shlex.split(arguments)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            copies.append(Copy(tuple(paths[:-1]), paths[-1], stage))
    return copies


def dockerignore_allows(ignore: Path, relative: str) -> bool:
    """Whether a path reaches the build (Docker's rule: the last matching pattern wins)."""
    allowed = True
    for line in ignore.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        glob = pattern.replace("**/", "*")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, glob) for p in prefixes):
            allowed = negate
    return allowed


def image_files(compose: dict[str, Any]) -> dict[str, Path]:
    """What the images hold at a container path, as repository files (COPY from the context)
    or the natively built plugin (COPY --from the stage that compiles it)."""
    files: dict[str, Path] = {}
    for service in compose["services"].values():
        dockerfile = REPO / service["build"]["dockerfile"]
        for copy in dockerfile_copies(dockerfile):
            if copy.stage is not None and copy.sources == ("/build/plugin/fleet_plugin.so",):
                files[copy.destination] = REPO / "broker" / "plugin" / "fleet_plugin.so"
            elif copy.stage is None and len(copy.sources) == 1:
                source = REPO / copy.sources[0]
                if source.is_file():  # folders are the packages pip installs: the repo here
                    files[copy.destination] = source
    return files


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions after a Dockerfile's last FROM: what the image that runs is made of."""
    instructions = dockerfile_instructions(path)
    last = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    return instructions[last + 1 :]


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    mode: int


def image_folders(dockerfile: Path) -> dict[str, Owner]:
    """The folders an image's final stage gives an owner and a mode (`chown UID:GID ...` and
    `chmod MODE ...` in its RUN lines): a named volume takes them at its first mount."""
    found: dict[str, dict[str, int]] = {}
    for instruction, arguments in final_stage(dockerfile):
        if instruction != "RUN":
            continue
        for command in re.split(r"&&|\|\||;", arguments):
            try:
                words = shlex.split(command)
            except ValueError:
                continue
            operands = [w for w in words[1:] if not w.startswith("-")]
            if words[:1] == ["chown"] and operands and re.fullmatch(r"\d+:\d+", operands[0]):
                uid, gid = (int(n) for n in operands[0].split(":"))
                for folder in operands[1:]:
                    found.setdefault(folder, {}).update(uid=uid, gid=gid)
            elif words[:1] == ["chmod"] and operands and re.fullmatch(r"[0-7]{3,4}", operands[0]):
                for folder in operands[1:]:
                    found.setdefault(folder, {})["mode"] = int(operands[0], 8)
    return {folder: Owner(**o) for folder, o in found.items() if len(o) == 3}


def _numeric_user(value: str, what: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", value)
    assert match, f"{what}: user {value!r} is not a numeric uid:gid"
    return int(match[1]), int(match[2])


def service_user(compose: dict[str, Any], name: str) -> tuple[int, int]:
    """(uid, gid) a service runs as: compose's `user:`, else its image's last USER."""
    service = compose["services"][name]
    if service.get("user") is not None:
        return _numeric_user(service["user"], f"{name} (compose user:)")
    dockerfile = REPO / service["build"]["dockerfile"]
    users = [words for instruction, words in final_stage(dockerfile) if instruction == "USER"]
    assert users, f"{name}: no compose `user:` and no USER in {dockerfile.name}: it runs as root"
    return _numeric_user(users[-1], f"{name} ({dockerfile.name} USER)")


def named_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(volume, container path, read-only) of a service's named volumes."""
    mounts = []
    for volume in service.get("volumes") or []:
        parts = volume.split(":")
        if not parts[0].startswith("."):
            mounts.append((parts[0], parts[1], "ro" in parts[2:]))
    return mounts


def volume_holding(service: dict[str, Any], path: Path) -> str | None:
    """The mount source (volume or bind) holding a container path: the deepest mount."""
    best: tuple[str, str] | None = None
    for volume in service.get("volumes") or []:
        source, target = volume.split(":")[:2]
        if path.is_relative_to(target) and (best is None or len(target) > len(best[1])):
            best = (source, target)
    return None if best is None else best[0]


def broker_side_dir(compose: dict[str, Any]) -> Path:
    """The folder the init service's `fleet-broker init` makes the PKI in (its --dir)."""
    script = init_script(compose).read_text().replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in script.splitlines()]
    (init,) = [words for words in lines if words[:1] == ["fleet-broker"]]
    return Path(_parse(broker_parser(), init[1:], "init script").dir)


def secret_volumes(compose: dict[str, Any]) -> dict[str, set[str]]:
    """Each private key of the broker side (file name) -> the volumes the init service puts it
    in: the broker side's folder, and wherever its script copies a file of that name."""
    init = compose["services"]["init"]
    pki = PkiPaths(broker_side_dir(compose))
    named = re.findall(r"(?<![\w/.-])(/[\w./-]+)", init_script(compose).read_text())
    homes: dict[str, set[str]] = {}
    for attribute in SECRET_FILES:
        secret = getattr(pki, attribute)
        paths = {secret} | {Path(p) for p in named if Path(p).name == secret.name}
        homes[secret.name] = {v for v in (volume_holding(init, p) for p in paths) if v}
    return homes


def conf_directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, []).append(value)
    return found


# ------------------------------------------------------------------------ static checks


def test_the_file_parses_and_holds_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == FLEET_SERVICES | MEASURE_SERVICES | LOCUST_SERVICES
    for name, service in services.items():
        profiles = [profile for profile, names in PROFILES.items() if name in names]
        assert service.get("profiles") == (profiles or None), name
        assert service["command"], f"{name}: no command"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency}: no healthcheck"
    assert services["broker"]["image"] == "mqtt-fleet/broker:dev"


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse's way of saying no; the message went to stderr
        raise AssertionError(f"{what}: {shlex.join(argv)} is refused by the parser") from exc


def _parse_with_own_parser(module: str, argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` with the parser ``python -m <module>`` builds, and stop there.

    broker.services builds its parser inside main(), so the parse is caught on its way out:
    nothing else of the module runs. In a subprocess, to leave this one untouched."""
    script = (
        "import argparse, json, runpy, sys\n"
        "original = argparse.ArgumentParser.parse_args\n"
        "def parse_only(self, args=None, namespace=None):\n"
        "    options = original(self, args, namespace)\n"
        "    print(json.dumps(vars(options), default=str))\n"
        "    raise SystemExit(0)\n"
        "argparse.ArgumentParser.parse_args = parse_only\n"
        f"sys.argv = [{module!r}, *sys.argv[1:]]\n"
        f"runpy.run_module({module!r}, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"python -m {module} {shlex.join(argv)}: {result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_fleet_sim_run(args: argparse.Namespace) -> None:
    """The scenario the options make must be valid, container paths aside."""
    from simulator.cli import RUN_OPTIONS

    given = {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k) is not None}
    scenario = Scenario(**given)
    problems = [p for p in validate(scenario) if "does not exist" not in p]
    assert problems == [], problems
    assert scenario.endpoint == BROKER_HOST and scenario.port == BROKER_PORT


def init_script(compose: dict[str, Any]) -> Path:
    (program,) = commands(compose)["init"]
    return image_files(compose)[f"/usr/local/bin/{program}"]


def test_every_command_is_ours_with_valid_options(compose: dict[str, Any]) -> None:
    cmds = commands(compose)

    script = init_script(compose)
    lines = [
        shlex.split(line, comments=True)
        for line in script.read_text().replace("\\\n", " ").splitlines()
    ]
    inits = [words for words in lines if words[:1] == ["fleet-broker"]]
    assert len(inits) == 1
    args = _parse(broker_parser(), inits[0][1:], "init script")
    assert args.command == "init" and args.host == [BROKER_HOST]
    python = [words for words in lines if words[:2] == ["python", "-c"]]
    assert python and all(compile(words[2], "init", "exec") for words in python)

    assert cmds["broker"][:2] == ["mosquitto", "-c"]
    services = compose["services"]
    # Health checks: the listener as /proc shows it, the file the services write when ready.
    assert f":{BROKER_PORT:04X} " in services["broker"]["healthcheck"]["test"][1]
    ready = RunFiles(load_config(Path("/fleet/pki")).run_dir).services_ready
    assert services["services"]["healthcheck"]["test"] == ["CMD", "test", "-f", str(ready)]

    # fleet-services runs broker.services with its arguments (and publishes the CRL).
    assert cmds["services"][0] == "fleet-services"
    wrapper = image_files(compose)[f"/usr/local/bin/{cmds['services'][0]}"].read_text()
    assert 'python -m broker.services "$@" &' in wrapper
    options = _parse_with_own_parser("broker.services", cmds["services"][1:])
    assert options["bind"] == BROKER_HOST and int(options["port"]) == BROKER_PORT

    assert cmds["agent"][0] == "fleet-agent"
    args = _parse(agent_parser(), cmds["agent"][1:], "agent")
    assert args.command == "run"

    assert cmds["simulator"][0] == "fleet-sim"
    args = _parse(sim_parser(), cmds["simulator"][1:], "simulator")
    assert args.command == "run"
    _check_fleet_sim_run(args)

    assert cmds["demo"][0] == "fleet-sim"
    args = _parse(sim_parser(), cmds["demo"][1:], "demo")
    assert args.command == "demo"
    assert args.endpoint == BROKER_HOST and args.port == BROKER_PORT
    assert args.pki == Path("/fleet/pki")
    problem = demo_problem(args)
    assert problem is None or "no such folder" in problem, problem  # the volume's, here


def test_the_demo_reaches_the_agent_by_its_control_socket_only(compose: dict[str, Any]) -> None:
    """The demo asks the running agent how it is (as scripts/demo asks its own): through the
    socket the agent's config names, in a volume both mount; never the agent's state folder,
    which holds the device key."""
    services = compose["services"]
    agent_config = tomllib.loads((REPO / "docker" / "agent.toml").read_text())["agent"]
    socket_path = Path(agent_config["control_socket"])
    assert _parse(sim_parser(), commands(compose)["demo"][1:], "demo").agent_control == (
        socket_path
    )

    def holding(service: str, path: Path) -> str:
        source = volume_holding(services[service], path)
        assert source is not None, f"{service}: no volume holds {path}"
        return source

    assert holding("agent", socket_path) == holding("demo", socket_path)
    state = holding("agent", Path(agent_config["state_dir"]))
    assert holding("agent", socket_path) != state
    for name, service in services.items():
        if name != "agent":
            assert not any(v.startswith(f"{state}:") for v in service.get("volumes") or []), name


def _locust_options(argv: list[str]) -> dict[str, Any]:
    """Locust's own parser with the locustfile's --fleet-* options, as `fleet-sim locust`
    runs it. In a subprocess: importing Locust patches the process with gevent."""
    from simulator.locust_command import LOCUSTFILE

    script = (
        "import json, sys\n"
        "import simulator.locustfile  # adds the --fleet-* options\n"
        "from locust.argument_parser import get_parser\n"
        "options = get_parser(default_config_files=[]).parse_args(sys.argv[1:])\n"
        "print(json.dumps(vars(options), default=str))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "-f", str(LOCUSTFILE), *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"locust {shlex.join(argv)}: {result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_locust_profile_runs_fleet_sim_locust_with_valid_options(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    parser = sim_parser()
    choices = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "locust" not in choices:
        pytest.skip("fleet-sim has no `locust` command yet (simulator/cli.py must add it)")
    cmds = commands(compose)
    master = cmds["locust-master"]
    worker = cmds["locust-worker"]
    for argv in (master, worker):
        assert argv[:2] == ["fleet-sim", "locust"]
        _parse(parser, argv[1:], "locust")
    # The locustfile checks that its files are readable: real ones stand in for the volume's.
    device = bootstrap.initialize(tmp_path / "device").root

    def here(argv: list[str]) -> list[str]:
        return [a.replace("/fleet/device/", f"{device}/") for a in argv]

    master_options = _locust_options(here(master[2:]))
    worker_options = _locust_options(here(worker[2:]))
    assert master_options["master"] and master_options["headless"]
    assert worker_options["worker"] and worker_options["master_host"] == "locust-master"
    for options in (master_options, worker_options):
        assert options["host"] == f"mqtts://{BROKER_HOST}:{BROKER_PORT}"
        assert options["fleet_ca"] == f"{device}/ca.pem"
        assert options["fleet_claim_cert"] == f"{device}/claim.pem"
        assert options["fleet_claim_key"] == f"{device}/claim.key"


def test_every_mounted_and_copied_path_exists(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        build = service["build"]
        assert (REPO / build["context"]).resolve() == REPO
        dockerfile = REPO / build["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        assert ignore.is_file(), f"{ignore}: every build sends an allow-list, never certs/"
        assert not dockerignore_allows(ignore, "certs/ca.key")
        assert not dockerignore_allows(ignore, "broker/plugin/fleet_plugin.so")
        stages = {
            words.split()[-1]
            for instruction, words in dockerfile_instructions(dockerfile)
            if instruction == "FROM" and " AS " in words.upper()
        }
        for copy in dockerfile_copies(dockerfile):
            if copy.stage is not None:
                assert copy.stage in stages, f"{dockerfile}: no stage {copy.stage}"
                continue
            for source in copy.sources:
                assert (REPO / source).exists(), f"{dockerfile}: {source} is missing"
                assert dockerignore_allows(ignore, source), f"{ignore} leaves out {source}"
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            assert target.startswith("/"), volume
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in declared, f"{name}: undeclared volume {source}"
                used.add(source)
    assert used == declared
    # Devices never see the CA key: only the device-files volume, read-only. (The demo service
    # is the operator as well, which the broker side's folder is for.)
    for name in ("agent", "simulator", *LOCUST_SERVICES):
        volumes = compose["services"][name]["volumes"]
        assert not any(v.startswith("pki:") for v in volumes), name
        assert "device-files:/fleet/device:ro" in volumes, name


def test_every_path_a_command_names_is_provided(compose: dict[str, Any]) -> None:
    """A path in a command or health check comes from a mount or from the image."""
    images = image_files(compose)
    for name, service in compose["services"].items():
        mounts = dict(reversed(v.split(":")[:2]) for v in service.get("volumes") or [])
        words = list(service["command"]) + list((service.get("healthcheck") or {}).get("test", []))
        paths = [p for w in words for p in re.findall(r"(?<![\w:/])(/[\w./-]+)", w)]
        for path in paths:
            if path in images or path == "/proc/net/tcp":
                continue
            target = next((t for t in mounts if path == t or path.startswith(t + "/")), None)
            assert target is not None, f"{name}: nothing provides {path}"
            source = mounts[target]
            if source.startswith("."):  # a bind mount: the file is in the repository
                assert (REPO / source / Path(path).relative_to(target)).exists(), path


def test_only_the_signers_see_the_ca_key_and_the_broker_no_key_but_its_own(
    compose: dict[str, Any],
) -> None:
    """Who mounts what holds a private key of the broker side (the native run checks the
    volumes' contents as well): the CA key and the service identity's key only the services
    that sign or revoke; the claim key also the devices; the broker none of the three."""
    services = compose["services"]
    homes = secret_volumes(compose)
    assert homes["ca.key"] and homes["service.key"] and homes["claim.key"]

    def seen_by(secret: str) -> set[str]:
        return {
            name
            for name, service in services.items()
            if any(volume in homes[secret] for volume, _, _ in named_mounts(service))
        }

    assert seen_by("ca.key") == SIGNERS
    assert seen_by("service.key") == SIGNERS
    assert "broker" not in seen_by("claim.key")
    broker_volumes = {volume for volume, _, _ in named_mounts(services["broker"])}
    assert not broker_volumes & set().union(*homes.values()), broker_volumes
    # Bind mounts are repository files, never a key.
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("."):
                files = [REPO / source] if (REPO / source).is_file() else (REPO / source).rglob("*")
                for file in files:
                    if file.is_file():
                        assert b"PRIVATE KEY" not in file.read_bytes(), f"{name}: {file}"


def test_no_container_runs_as_root(compose: dict[str, Any]) -> None:
    for name in compose["services"]:
        uid, gid = service_user(compose, name)
        assert uid != 0 and gid != 0, f"{name} runs as {uid}:{gid}"
    # The images as well, when run without compose's `user:`.
    for dockerfile in {REPO / s["build"]["dockerfile"] for s in compose["services"].values()}:
        users = [w for instruction, w in final_stage(dockerfile) if instruction == "USER"]
        assert users and _numeric_user(users[-1], dockerfile.name)[0] != 0, dockerfile.name
    # eclipse-mosquitto's own user, the one its image's /mosquitto belongs to.
    assert service_user(compose, "broker") == (1883, 1883)


def _may(owner: Owner, uid: int, gid: int, write: bool) -> bool:
    """Whether uid:gid (no other groups) may list and enter a folder (and, write, create in it)."""
    shift = 6 if uid == owner.uid else 3 if gid == owner.gid else 0
    need = 0o7 if write else 0o5
    return (owner.mode >> shift) & need == need


def test_every_named_volume_is_owned_so_that_its_users_can_use_it(
    compose: dict[str, Any],
) -> None:
    """A named volume takes the owner and mode of the mount point in the image of the first
    container that mounts it: every image mounting a volume creates that folder, all alike,
    and every service may use its volumes as it mounts them (read-only or not)."""
    owners: dict[str, set[Owner]] = {}
    for name, service in compose["services"].items():
        folders = image_folders(REPO / service["build"]["dockerfile"])
        uid, gid = service_user(compose, name)
        for volume, target, read_only in named_mounts(service):
            owner = folders.get(target)
            assert owner is not None, (
                f"{name}: {service['build']['dockerfile']} gives {target} no owner and mode "
                f"(chown, chmod): the volume {volume} would be root's"
            )
            owners.setdefault(volume, set()).add(owner)
            assert _may(owner, uid, gid, write=not read_only), (
                f"{name} ({uid}:{gid}) cannot {'read' if read_only else 'write'} {volume} "
                f"at {target} ({owner.uid}:{owner.gid} {owner.mode:04o})"
            )
    for volume, found in owners.items():
        assert len(found) == 1, f"{volume}: the images' mount points differ: {found}"
    # The broker side's folder is its writers' alone.
    for volume in secret_volumes(compose)["ca.key"]:
        (owner,) = owners[volume]
        assert owner.mode & 0o077 == 0, f"{volume}: {owner.mode:04o}"


def test_the_broker_image_is_mosquitto_2_0_with_the_plugin_built_for_it() -> None:
    instructions = dockerfile_instructions(REPO / "docker" / "broker.Dockerfile")
    args = dict(words.split("=", 1) for instruction, words in instructions if instruction == "ARG")
    assert args["MOSQUITTO_IMAGE"] == "eclipse-mosquitto:2.0"  # `2`/latest are 2.1 now
    froms = [words for instruction, words in instructions if instruction == "FROM"]
    assert froms == ["${MOSQUITTO_IMAGE} AS plugin", "${MOSQUITTO_IMAGE}"]
    runs = " ".join(words for instruction, words in instructions if instruction == "RUN")
    for needed in ("openssl-dev", "sqlite-dev", "sqlite-libs", "sha256sum -c", "make -C"):
        assert needed in runs
    makefile = (REPO / "broker" / "plugin" / "Makefile").read_text()
    assert "-lsqlite3 -lcrypto" in makefile  # what the runtime stage must provide


def test_the_broker_container_config_is_what_fleet_broker_renders(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    config = load_config(broker_side_dir(compose), port=BROKER_PORT, bind_address="0.0.0.0")
    rendered = render_conf(config, RunFiles(config.run_dir), "mosquitto")

    ours, theirs = conf_directives(BROKER_CONF.read_text()), conf_directives(rendered)
    assert set(ours) == set(theirs)
    # Where the container's files live differs; everything else is the same. The broker side's
    # files are copies outside its folder (which the broker never mounts), the registry is
    # the shared volume: the native run checks that they are what the broker side holds.
    moved = {
        "plugin": ["/usr/lib/mosquitto-fleet/fleet_plugin.so"],
        "acl_file": ["/etc/fleet/mosquitto/deny-all.acl"],
        "persistence_location": ["/mosquitto/data/"],
        "plugin_opt_registry": ["/fleet/registry/registry.db"],
        "plugin_opt_policy": ["/fleet/broker/policy.acl"],
        "cafile": ["/fleet/broker/ca.pem"],
        "certfile": ["/fleet/broker/broker.pem"],
        "keyfile": ["/fleet/broker/broker.key"],
        "crlfile": ["/fleet/crl/crl.pem"],
    }
    for key, values in theirs.items():
        assert ours[key] == moved.get(key, values), key
    assert moved["plugin"][0] in image_files(compose)
    broker = compose["services"]["broker"]
    for key in moved:
        if key != "plugin":
            assert volume_holding(broker, Path(ours[key][0])), f"no broker mount holds {key}"
    mount = next(v for v in compose["services"]["broker"]["volumes"] if v.startswith("./"))
    assert mount == "./docker/mosquitto:/etc/fleet/mosquitto:ro"
    # The fallback ACL as fleet-broker writes it into its run folder.
    written = prepare_run_dir(replace(config, run_dir=tmp_path / "run")).fallback_acl
    assert (REPO / "docker" / "mosquitto" / "deny-all.acl").read_text() == written.read_text()


# --------------------------------------------------------------------- the stack, natively


class NativeStack:
    """The compose services' command lines, run here: container paths map to a temp folder,
    the host name `broker` to localhost, port 8883 to a free port.

    Volumes are folders; a volume mounted inside another (the registry in the broker side's
    folder) is a symlink there. As root, every command runs as its service's uid:gid (without
    other groups), and each volume folder gets the owner and mode of its mount point in the
    image, as Docker gives a new named volume: what the containers may do with the files, the
    native run may too, no more."""

    def __init__(self, compose: dict[str, Any], root: Path) -> None:
        self.compose = compose
        self.root = root
        self.port = free_port()
        self.bin = root / "bin"
        self.bin.mkdir()
        self.paths: dict[str, Path] = {}
        for volume in compose["volumes"]:
            (root / "volumes" / volume).mkdir(parents=True)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO),
        }
        for name, service in compose["services"].items():
            for volume, target, _ in named_mounts(service):
                here = root / "volumes" / volume
                assert self.paths.setdefault(target, here) == here, f"{name}: {target} differs"
        for service in compose["services"].values():  # a volume inside another: a symlink
            mounts = named_mounts(service)
            for _, target, _ in mounts:
                for outer, outer_target, _ in mounts:
                    if target != outer_target and Path(target).is_relative_to(outer_target):
                        inside = root / "volumes" / outer / Path(target).relative_to(outer_target)
                        if not inside.is_symlink():
                            inside.parent.mkdir(parents=True, exist_ok=True)
                            inside.symlink_to(self.paths[target], target_is_directory=True)
        self.users = self._users()
        if self.users:
            self._own_volumes()
        # Every container path is known before any file is translated.
        copies: list[tuple[Path, Path]] = []
        for service in compose["services"].values():  # bind mounts: translated copies
            for volume in service.get("volumes") or []:
                source, target = volume.split(":")[:2]
                if source.startswith("."):
                    copies.append((REPO / source, root / "binds"))
                    self.paths[target] = root / "binds" / (REPO / source).relative_to(REPO)
        for target, path in image_files(compose).items():
            if path.suffix == ".so":  # the plugin, built natively, copied as the image does:
                copy = root / "image" / path.relative_to(REPO)  # its folder, unlike a clone's,
                copy.parent.mkdir(parents=True, exist_ok=True)  # is open to Mosquitto's user
                shutil.copyfile(path, copy)
                self.paths[target] = copy
            else:
                copies.append((path, root / "image"))
                self.paths[target] = root / "image" / path.relative_to(REPO)
        for source, into in copies:
            self._translated_copy(source, into)
        for program, module in (
            ("fleet-broker", "broker.cli"),
            ("fleet-agent", "agent.cli"),
            ("fleet-sim", "simulator.cli"),
        ):
            self._shim(program, f'exec {shlex.quote(sys.executable)} -m {module} "$@"')
        self._shim("python", f'exec {shlex.quote(sys.executable)} "$@"')
        for target in image_files(compose):  # our scripts: fleet-init, fleet-services
            if target.startswith("/usr/local/bin/"):
                self._shim(Path(target).name, f'exec sh {self.paths[target]} "$@"')

    def _users(self) -> dict[str, tuple[int, int]]:
        """Each service's uid:gid, if this process may take them (root) and they can run the
        Python here; else {} and everything runs as we do."""
        if os.geteuid() != 0:
            return {}
        users = {name: service_user(self.compose, name) for name in self.compose["services"]}
        for uid, gid in set(users.values()):
            try:
                probe = subprocess.run(
                    [sys.executable, "-c", "import broker.cli, agent.cli, simulator.cli"],
                    cwd=self.root,
                    env=self.env,
                    user=uid,
                    group=gid,
                    extra_groups=[],
                    capture_output=True,
                    timeout=60,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                problem = str(exc)
            else:
                problem = probe.stderr.decode(errors="replace").strip()[-300:]
                if probe.returncode == 0:
                    continue
            warnings.warn(
                f"the native stack runs as root, not as its containers' users: {sys.executable} "
                f"cannot run as {uid}:{gid} ({problem}); file modes are not checked",
                stacklevel=2,
            )
            return {}
        for uid in {uid for uid, _ in users.values()}:
            home = self.root / "home" / str(uid)
            home.mkdir(parents=True)
            os.chown(home, uid, -1)
            home.chmod(0o700)
        return users

    def _own_volumes(self) -> None:
        """Each volume as Docker makes it at its first mount: the owner and mode of the mount
        point in the image of the first service mounting it (none: root's, 0755)."""
        owned: set[str] = set()
        for service in self.compose["services"].values():
            folders = image_folders(REPO / service["build"]["dockerfile"])
            for volume, target, _ in named_mounts(service):
                if volume in owned:
                    continue
                owned.add(volume)
                owner = folders.get(target, Owner(0, 0, 0o755))
                folder = self.root / "volumes" / volume
                os.chown(folder, owner.uid, owner.gid)
                folder.chmod(owner.mode)

    def _as(self, service: str) -> dict[str, Any]:
        """subprocess keyword arguments to run as the service's user."""
        if service not in self.users:
            return {"env": self.env}
        uid, gid = self.users[service]
        env = {**self.env, "HOME": str(self.root / "home" / str(uid))}
        return {"env": env, "user": uid, "group": gid, "extra_groups": []}

    def _shim(self, name: str, line: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{line}\n")
        path.chmod(0o755)

    def _translated_copy(self, source: Path, into: Path) -> Path:
        target = into / source.relative_to(REPO)
        if source.is_dir():
            for file in source.rglob("*"):
                if file.is_file():
                    self._translated_copy(file, into)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.translate(source.read_text()))
        target.chmod(source.stat().st_mode & 0o777)
        return target

    def host(self, path: str) -> Path:
        """Where a container path is here."""
        return Path(self.translate(path))

    def translate(self, text: str) -> str:
        # Longest first: a path is mapped before any shorter one that starts it.
        for container in sorted(self.paths, key=len, reverse=True):
            text = re.sub(
                rf"(?<![\w/.-]){re.escape(container)}(?![\w.-])", str(self.paths[container]), text
            )
        text = text.replace(
            f"mqtts://{BROKER_HOST}:{BROKER_PORT}", f"mqtts://localhost:{self.port}"
        )
        # Where clients connect, `broker` is localhost here (config files quote it; command
        # lines are handled in argv); `init --host broker` stays, so the broker certificate
        # names what the containers connect to.
        text = text.replace(f'"{BROKER_HOST}"', '"localhost"')
        text = re.sub(rf"(?<![\w.]){BROKER_PORT}(?!\w)", str(self.port), text)
        text = text.replace(f"{BROKER_PORT:04X}", f"{self.port:04X}")  # /proc/net/tcp
        return text.replace("0.0.0.0", "127.0.0.1")

    def argv(self, service: str, *extra: str) -> list[str]:
        command = self.compose["services"][service]["command"]
        argv = [self.translate(a) for a in command]
        argv = [
            "localhost" if a == BROKER_HOST and command[i - 1] != "--host" else a
            for i, a in enumerate(argv)
        ]
        if argv[0] == "mosquitto":
            argv[0] = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return argv + list(extra)

    def run(self, service: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(service, *extra),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **self._as(service),
        )

    def start(self, service: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{service}.log", "wb")  # noqa: SIM115 (closed in stop_all)
        process = subprocess.Popen(
            self.argv(service),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            **self._as(service),
        )
        self.processes.append(process)
        return process

    def healthy(self, service: str) -> bool:
        test = self.compose["services"][service]["healthcheck"]["test"]
        kind, argv = test[0], [self.translate(a) for a in test[1:]]
        command = ["sh", "-c", argv[0]] if kind == "CMD-SHELL" else argv
        return subprocess.run(command, env=self.env, capture_output=True).returncode == 0

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            for process in self.processes:
                assert process.poll() is None, f"{process.args[0]} exited: {self.logs()}"
            assert time.monotonic() < deadline, f"{what} not reached: {self.logs()}"
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}"
            for log in sorted(self.root.glob("*.log"))
        )

    def stop_all(self) -> None:
        for process in reversed(self.processes):  # agent, services, then the broker
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def native(compose: dict[str, Any]) -> Iterator[NativeStack]:
    root = make_workdir()
    stack = NativeStack(compose, root)
    try:
        yield stack
    finally:
        stack.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def _agent_status(native: NativeStack, config: str) -> dict[str, Any] | None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--config", config, "--json"],
        env=native.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    with contextlib.suppress(ValueError):
        status = json.loads(result.stdout)
        runtime = status.get("runtime") or {}
        shadows = runtime.get("shadows") or {}
        synced = shadows and all(s.get("last_sync") for s in shadows.values())
        if runtime.get("state") == "connected" and synced:
            return status
    return None


def _secrets_by_volume(native: NativeStack, pki: PkiPaths) -> dict[str, set[str]]:
    """Volume -> the broker side's private keys (file names) found in it: a file of that name,
    or any file holding that key (symlinks aside: the registry's, to its own volume)."""
    secrets = {getattr(pki, a).name: getattr(pki, a).read_bytes().strip() for a in SECRET_FILES}
    found: dict[str, set[str]] = {}
    for volume in native.compose["volumes"]:
        for folder, _, files in os.walk(native.root / "volumes" / volume):
            for file in files:
                path = Path(folder, file)
                if path.is_symlink() or not path.is_file():
                    continue
                data = path.read_bytes()
                for name, secret in secrets.items():
                    if file == name or secret in data:
                        found.setdefault(volume, set()).add(name)
    return found


def _check_who_sees_what(native: NativeStack, pki: PkiPaths) -> None:
    found = _secrets_by_volume(native, pki)
    assert found, "no key found at all: the scan looks in the wrong place"
    for name, service in native.compose["services"].items():
        seen = set().union(*(found.get(v, set()) for v, _, _ in named_mounts(service)))
        if name == "broker":
            assert not seen, f"the broker's volumes hold {seen}: {found}"
        elif name not in SIGNERS:
            assert not seen & {pki.ca_key.name, pki.service_key.name}, (name, found)


def _check_the_broker_view(native: NativeStack, pki: PkiPaths) -> None:
    """What the broker container reads is what the broker side holds."""
    conf = conf_directives(BROKER_CONF.read_text())
    for key, attribute in BROKER_COPIES.items():
        copy = native.host(conf[key][0])
        assert copy.read_bytes() == getattr(pki, attribute).read_bytes(), key
    assert native.host(conf["plugin_opt_registry"][0]).samefile(pki.registry)
    policy_text = native.host(conf["plugin_opt_policy"][0]).read_text()
    assert policy_text == render_policy()
    # SQLite gives -wal and -shm the database's mode: the broker's group must write them.
    assert pki.registry.stat().st_mode & 0o777 == 0o660


def _published_crl(native: NativeStack, pki: PkiPaths) -> x509.CertificateRevocationList | None:
    """The CRL in the broker's view once it is the broker side's, else None."""
    crl = native.host(conf_directives(BROKER_CONF.read_text())["crlfile"][0])
    data = crl.read_bytes()
    return x509.load_pem_x509_crl(data) if data == pki.crl.read_bytes() else None


def test_the_stack_runs_natively_from_the_compose_command_lines(native: NativeStack) -> None:
    # init: the PKI once, the policy, the device files; a second run changes nothing.
    for _ in range(2):
        result = native.run("init")
        assert result.returncode == 0, result.stderr
    pki = PkiPaths(native.host(str(broker_side_dir(native.compose))))
    device = native.paths["/fleet/device"]
    assert sorted(p.name for p in device.iterdir()) == ["ca.pem", "claim.key", "claim.pem"]
    assert (device / "claim.key").stat().st_mode & 0o077 == 0
    broker_cert = x509.load_pem_x509_certificate(pki.broker_cert.read_bytes())
    names = broker_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert BROKER_HOST in names.get_values_for_type(x509.DNSName)
    _check_the_broker_view(native, pki)
    assert _published_crl(native, pki) is not None
    _check_who_sees_what(native, pki)

    # Run as root without the services' users, Mosquitto drops to the host's mosquitto user
    # (`user mosquitto`): as the eclipse-mosquitto entry point does, give it the data folder.
    data = native.paths["/mosquitto/data"]
    if os.geteuid() == 0 and not native.users:
        shutil.chown(data, "mosquitto", "mosquitto")
    native.start("broker")
    native.wait(lambda: native.healthy("broker"), "broker health check")
    native.start("services")
    native.wait(lambda: native.healthy("services"), "services health check")

    # The agent: a valid config, then onboarding and the first shadow sync.
    config = native.paths["/etc/fleet-agent/agent.toml"]
    check = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "check", "--config", str(config)],
        env=native.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    native.start("agent")
    status = native.wait(lambda: _agent_status(native, str(config)), "agent synced", 40)
    assert status["thing"] == "gateway-0000"

    # The demo, with that agent: every check of scripts/demo passes (a smaller fleet).
    result = native.run("demo", "--devices", "6", timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr + native.logs()
    # Every check of scripts/demo but stopping the agent, which is not the demo's to stop here.
    assert f"PASS: all {len(DEMO_CHECKS) - 1} checks passed" in result.stdout, result.stdout
    assert "fleet-agent (running already)" in result.stdout
    after = _agent_status(native, str(config))
    assert after is not None and after["thing"] == "gateway-0000", "the demo disturbed the agent"

    # The demo's revocation reaches the broker's CRL (the services copy it), and Mosquitto
    # reloads it on SIGHUP (`docker compose kill -s HUP broker`) and goes on serving.
    crl = native.wait(lambda: _published_crl(native, pki), "the revocation's CRL published", 10)
    assert len(list(crl)) >= 1
    broker = native.processes[0]
    broker.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    native.wait(lambda: native.healthy("broker"), "broker health check after SIGHUP")

    # The simulator's run, smaller and shorter than in compose: the same options otherwise.
    result = native.run(
        "simulator", "--devices", "4", "--rate", "20", "--hold", "1", "--update-interval", "0.5"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr + native.logs()
    report = json.loads((native.paths["/reports"] / "fleet-sim" / "report.json").read_text())
    assert report["devices"]["onboarded"] == 4
    assert report["errors_total"] == 0
    assert report["steps"]["shadow_update"]["count"] > 0

    _check_who_sees_what(native, pki)  # the demo and the services changed the volumes
    native.stop_all()
    assert all(p.returncode == 0 for p in native.processes), native.logs()


def test_the_agent_config_is_valid_for_the_agent() -> None:
    document = tomllib.loads((REPO / "docker" / "agent.toml").read_text())
    assert document["broker"]["endpoint"] == BROKER_HOST
    assert document["broker"]["port"] == BROKER_PORT
    for key in ("ca_file",):
        assert document["broker"][key].startswith("/fleet/device/")
    assert document["claim"]["key"] == "/fleet/device/claim.key"

"""docker-compose.yml without a container engine: what can be proven here, is.

- The file parses, and every service runs a real command of ours with options our own argparse
  parsers (and Locust's, with the locustfile's options) accept.
- Every mounted or copied path exists in the repository; the Dockerfiles send only what they
  install; the Mosquitto config of the broker container is the one `fleet-broker up` renders.
- The same command lines, run natively against a real Mosquitto with the plugin (container
  paths mapped to a temp folder, the `broker` host name to localhost, port 8883 to a free
  one), do what the stack is for: init -> broker and services up (their health checks pass)
  -> the agent provisions and syncs -> the demo passes every check, as scripts/demo does,
  with that agent -> the measured simulator run completes.
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
from simulator.cli import build_parser as sim_parser
from simulator.cli import demo_problem
from simulator.scenario import Scenario, validate
from tests.fleet import REPO, free_port, make_workdir
from tests.test_demo import CHECKS as DEMO_CHECKS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPOSE = REPO / "docker-compose.yml"
FLEET_SERVICES = {"init", "broker", "services", "agent", "demo"}
MEASURE_SERVICES = {"simulator"}
LOCUST_SERVICES = {"locust-master", "locust-worker"}
PROFILES = {"measure": MEASURE_SERVICES, "locust": LOCUST_SERVICES}
BROKER_HOST, BROKER_PORT = "broker", 8883


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

    assert cmds["services"][:3] == ["python", "-m", "broker.services"]
    options = _parse_with_own_parser("broker.services", cmds["services"][3:])
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

    def volume_holding(service: str, path: Path) -> str:
        for volume in services[service]["volumes"]:
            source, target = volume.split(":")[:2]
            if path.is_relative_to(target):
                return source
        raise AssertionError(f"{service}: no volume holds {path}")

    assert volume_holding("agent", socket_path) == volume_holding("demo", socket_path)
    state = volume_holding("agent", Path(agent_config["state_dir"]))
    assert volume_holding("agent", socket_path) != state
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
    container = REPO / "docker" / "mosquitto" / "mosquitto.conf"
    config = load_config(Path("/fleet/pki"), port=BROKER_PORT, bind_address="0.0.0.0")
    rendered = render_conf(config, RunFiles(config.run_dir), "mosquitto")

    def directives(text: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition(" ")
                found.setdefault(key, []).append(value)
        return found

    ours, theirs = directives(container.read_text()), directives(rendered)
    assert set(ours) == set(theirs)
    # Where the container's files live differs; everything else is the same.
    moved = {
        "plugin": ["/usr/lib/mosquitto-fleet/fleet_plugin.so"],
        "acl_file": ["/etc/fleet/mosquitto/deny-all.acl"],
        "persistence_location": ["/mosquitto/data/"],
    }
    for key, values in theirs.items():
        assert ours[key] == moved.get(key, values), key
    assert moved["plugin"][0] in image_files(compose)
    mount = next(v for v in compose["services"]["broker"]["volumes"] if v.startswith("./"))
    assert mount == "./docker/mosquitto:/etc/fleet/mosquitto:ro"
    # The fallback ACL as fleet-broker writes it into its run folder.
    written = prepare_run_dir(replace(config, run_dir=tmp_path / "run")).fallback_acl
    assert (REPO / "docker" / "mosquitto" / "deny-all.acl").read_text() == written.read_text()


# --------------------------------------------------------------------- the stack, natively


class NativeStack:
    """The compose services' command lines, run here: container paths map to a temp folder,
    the host name `broker` to localhost, port 8883 to a free port."""

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
        for service in compose["services"].values():
            for volume in service.get("volumes") or []:
                source, target = volume.split(":")[:2]
                if not source.startswith("."):
                    self.paths[target] = root / "volumes" / source
        # Every container path is known before any file is translated.
        copies: list[tuple[Path, Path]] = []
        for service in compose["services"].values():  # bind mounts: translated copies
            for volume in service.get("volumes") or []:
                source, target = volume.split(":")[:2]
                if source.startswith("."):
                    copies.append((REPO / source, root / "binds"))
                    self.paths[target] = root / "binds" / (REPO / source).relative_to(REPO)
        for target, path in image_files(compose).items():
            if path.suffix == ".so":
                self.paths[target] = path  # the plugin, built natively
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
        self._shim("fleet-init", f'exec sh {self.paths["/usr/local/bin/fleet-init"]} "$@"')

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
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, service: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{service}.log", "wb")  # noqa: SIM115 (closed in stop_all)
        process = subprocess.Popen(
            self.argv(service),
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
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


def test_the_stack_runs_natively_from_the_compose_command_lines(native: NativeStack) -> None:
    # init: the PKI once, the policy, the device files; a second run changes nothing.
    for _ in range(2):
        result = native.run("init")
        assert result.returncode == 0, result.stderr
    pki, device = PkiPaths(native.paths["/fleet/pki"]), native.paths["/fleet/device"]
    assert sorted(p.name for p in device.iterdir()) == ["ca.pem", "claim.key", "claim.pem"]
    assert (device / "claim.key").stat().st_mode & 0o077 == 0
    broker_cert = x509.load_pem_x509_certificate(pki.broker_cert.read_bytes())
    names = broker_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert BROKER_HOST in names.get_values_for_type(x509.DNSName)

    # The eclipse-mosquitto entry point gives /mosquitto to its user; so does this test.
    data = native.paths["/mosquitto/data"]
    if os.geteuid() == 0:
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

    # The simulator's run, smaller and shorter than in compose: the same options otherwise.
    result = native.run(
        "simulator", "--devices", "4", "--rate", "20", "--hold", "1", "--update-interval", "0.5"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr + native.logs()
    report = json.loads((native.paths["/reports"] / "fleet-sim" / "report.json").read_text())
    assert report["devices"]["onboarded"] == 4
    assert report["errors_total"] == 0
    assert report["steps"]["shadow_update"]["count"] > 0

    native.stop_all()
    assert all(p.returncode == 0 for p in native.processes), native.logs()


def test_the_agent_config_is_valid_for_the_agent() -> None:
    document = tomllib.loads((REPO / "docker" / "agent.toml").read_text())
    assert document["broker"]["endpoint"] == BROKER_HOST
    assert document["broker"]["port"] == BROKER_PORT
    for key in ("ca_file",):
        assert document["broker"][key].startswith("/fleet/device/")
    assert document["claim"]["key"] == "/fleet/device/claim.key"

"""The deployment files in deploy/ say what the code accepts: the Kubernetes manifests validate
against the Kubernetes API schemas (kubernetes-validate, strict: no unknown fields), and every
ringtrain command line in them parses with ringtrain's own parser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ringtrain.cli.main import build_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                          reason="kubernetes-validate (test extra) missing")
yaml = pytest.importorskip("yaml", reason="PyYAML (kubernetes-validate's dependency) missing")

DEPLOY = Path(__file__).parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]  # oldest supported, newest


def documents() -> list[tuple[str, dict]]:
    return [(path.name, document) for path in MANIFESTS
            for document in yaml.safe_load_all(path.read_text()) if document]


def parses(argv: list[str]) -> None:
    """``ringtrain ARGV`` is a valid command line (argparse exits 2 otherwise)."""
    build_parser(argv[0]).parse_args(argv)


def test_manifests_exist() -> None:
    kinds = sorted(document["kind"] for _, document in documents())
    assert kinds == ["PodDisruptionBudget", "Service", "StatefulSet"]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    for name, document in documents():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({document['kind']}) is not valid Kubernetes {version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_statefulset_runs_commands_ringtrain_accepts() -> None:
    (statefulset,) = [d for _, d in documents() if d["kind"] == "StatefulSet"]
    (service,) = [d for _, d in documents() if d["kind"] == "Service"]
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    parses(container["args"])
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[0] == "ringtrain"
    parses(probe[1:])
    args = build_parser("node").parse_args(container["args"])
    assert args.peers_dns == service["metadata"]["name"] == statefulset["spec"]["serviceName"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    (key,) = [v for v in pod["volumes"] if v["name"] == "key"]
    assert key["secret"]["defaultMode"] == 0o400  # ringtrain refuses a key others can read
    assert pod["securityContext"]["runAsNonRoot"]


def test_compose_files_run_commands_ringtrain_accepts() -> None:
    for name in ("compose.mdns.yaml", "compose.peers.yaml"):
        compose = yaml.safe_load((DEPLOY / "container" / name).read_text())
        services = compose["services"]
        assert len(services) >= 3, name
        for service in services.values():
            parses(service["command"])
            assert service["volumes"][0].endswith(":/run/secrets/job.key:ro")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on an instance of the unit, in a root that has what the
    unit names (the executable, the options file, the key), as an installed system would."""
    unit = DEPLOY / "systemd" / "ringtrain@.service"
    system_units = Path("/usr/lib/systemd/system")
    if not system_units.is_dir():
        pytest.skip(f"no {system_units}: systemd's own units (targets) are needed")
    shutil.copytree(system_units, tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)
    units = tmp_path / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(unit, units)
    executable = tmp_path / "opt" / "ringtrain" / "bin" / "ringtrain"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    etc = tmp_path / "etc" / "ringtrain"
    etc.mkdir()
    shutil.copy(DEPLOY / "systemd" / "example.env", etc / "digits.env")
    (etc / "digits.key").write_text("")
    done = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}",
                           "ringtrain@digits.service"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    exec_start = " ".join(line.strip().rstrip("\\") for line in unit.read_text().split(
        "ExecStart=", 1)[1].split("\n# ", 1)[0].splitlines())
    argv = exec_start.replace("${CREDENTIALS_DIRECTORY}", "/run/credentials/x").replace(
        "${STATE_DIRECTORY}", "/var/lib/ringtrain/x").replace(
        "${RUNTIME_DIRECTORY}", "/run/ringtrain/x").replace("$RINGTRAIN_ARGS", "").split()
    assert argv[0] == "/opt/ringtrain/bin/ringtrain"
    parses(argv[1:])

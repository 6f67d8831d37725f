"""The deployment files in deploy/ say what the code accepts: the Kubernetes manifests validate
against the Kubernetes API schemas (kubernetes-validate, strict: no unknown fields), and every
ringtrain command line in them parses with ringtrain's own parser."""

from __future__ import annotations

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

"""deploy/checks/manifests.py `pod`: what it lets through of the pod's network boundary.

`make deploy-check` renders the kustomization with kubectl; here the base's files are put together as kustomize
would (the ConfigMap the PEP config comes from, unhashed names), so the check itself is tested without the deploy
tools. The NetworkPolicy check used to compare only the ports listed in ingress rules: a rule without ports, or
without `from`, admits every port or every peer, and an egress rule without `to` or `ports` (or an ipBlock of
0.0.0.0/0) opens every destination to the agent, which shares the pod's network namespace. All of that passed.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy/kubernetes/base"


def _checks() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_manifests", REPO / "deploy/checks/manifests.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


manifests = _checks()


def rendered() -> list[dict[str, Any]]:
    docs = [yaml.safe_load((BASE / name).read_text()) for name in ("deployment.yaml", "networkpolicy.yaml")]
    docs.append(yaml.safe_load((BASE / "podmonitor.yaml").read_text()))
    config = (BASE / "pep/config.yaml").read_text()
    docs.append(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "pep-config"}, "data": {"config.yaml": config}}
    )
    return docs


def run(docs: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The problems `pod` reports (empty when it passes)."""
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    code = manifests.pod(str(path), str(tmp_path / "out"))
    errors = capsys.readouterr().err
    assert (code == 0) == (errors == "")
    return errors


def policy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec: dict[str, Any] = found["spec"]
    return spec


def test_the_base_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(rendered(), tmp_path, capsys) == ""


def _ingress_without_ports(spec: dict[str, Any]) -> None:
    del spec["ingress"][0]["ports"]


def _ingress_from_anyone(spec: dict[str, Any]) -> None:
    del spec["ingress"][0]["from"]


def _ingress_allow_all(spec: dict[str, Any]) -> None:
    spec["ingress"].append({})


def _egress_to_anywhere(spec: dict[str, Any]) -> None:
    spec["egress"].append({"ports": [{"protocol": "TCP", "port": 443}]})


def _egress_any_port(spec: dict[str, Any]) -> None:
    del spec["egress"][1]["ports"]


def _egress_whole_internet(spec: dict[str, Any]) -> None:
    spec["egress"][2]["to"] = [{"ipBlock": {"cidr": "0.0.0.0/0"}}]


def _egress_whole_internet_v6(spec: dict[str, Any]) -> None:
    spec["egress"][2]["to"] = [{"ipBlock": {"cidr": "::/0"}}]


def _egress_empty_peer(spec: dict[str, Any]) -> None:
    spec["egress"][1]["to"] = [{}]


def _egress_every_namespace(spec: dict[str, Any]) -> None:
    spec["egress"][1]["to"] = [{"namespaceSelector": {}}]


@pytest.mark.parametrize(
    "weaken",
    [
        _ingress_without_ports,
        _ingress_from_anyone,
        _ingress_allow_all,
        _egress_to_anywhere,
        _egress_any_port,
        _egress_whole_internet,
        _egress_whole_internet_v6,
        _egress_empty_peer,
        _egress_every_namespace,
    ],
)
def test_a_network_policy_that_opens_the_pod_is_refused(
    weaken: Callable[[dict[str, Any]], None], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = copy.deepcopy(rendered())
    weaken(policy(docs))
    assert "NetworkPolicy/support-agent" in run(docs, tmp_path, capsys)

"""Checks of the rendered Kubernetes manifests for `make deploy-check` (deploy/deploy.mk).

Run with the deploy tools' venv (PyYAML). Subcommands:

  split RENDERED CORE_YAML CRDS_JSON
      Core resources go to CORE_YAML (for kubernetes-validate), the Prometheus Operator resources to CRDS_JSON
      (for validate_crds.cjs). A kind that is in neither list is an error, never skipped.
  pod RENDERED OUTDIR
      Checks the properties the README (Operations) promises of the agent pod (hardened containers, the native
      sidecars, probes on the admin port, the Secret mounted only into the PEP container, PodMonitor and
      NetworkPolicy aimed at that port), and writes the PEP config found in the rendered ConfigMap to
      OUTDIR/config.yaml for `pep check`, with the files it names replaced by stand-ins (see below).
  rules PROMETHEUSRULE_YAML RULES_YAML
      Writes the PrometheusRule's spec (a plain Prometheus rules file) for promtool.

Why stand-ins: the config names files that exist only in the pod (the upstream token from the Secret).
`pep check` may read such files (it refuses an unreadable or empty PDP token file, for instance), so the copy
it checks has every `value_file` pointed at a dummy token under OUTDIR, after this script has checked that
the original path lies in a Secret volume mounted into the PEP container, with the right key.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
CORE_KINDS = {
    ("v1", "ConfigMap"),
    ("v1", "Namespace"),
    ("v1", "Secret"),
    ("v1", "ServiceAccount"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}
PEP_CONTAINER = "pep"
TOKEN_STAND_IN = "stand-in-token-for-pep-check\n"  # noqa: S105 (a dummy, written for pep check only)


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, where: str, what: str) -> None:
        if not ok:
            self.items.append(f"{where}: {what}")


def load_all(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def split(rendered: str, core_out: str, crds_out: str) -> int:
    core, crds, unknown = [], [], []
    for doc in load_all(rendered):
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CRD_KINDS:
            crds.append(doc)
        elif key in CORE_KINDS:
            core.append(doc)
        else:
            unknown.append(f"{key[0]} {key[1]}")
    if unknown:
        print(
            f"{rendered}: kinds neither kubernetes-validate nor validate_crds.cjs is set up for: {unknown};"
            " add them to CORE_KINDS or CRD_KINDS in deploy/checks/manifests.py",
            file=sys.stderr,
        )
        return 1
    with open(core_out, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    with open(crds_out, "w", encoding="utf-8") as f:
        json.dump(crds, f)
    print(f"{rendered}: {len(core)} core resources, {len(crds)} Prometheus Operator resources")
    return 0


def _open_peer(peer: Any) -> bool:
    """A NetworkPolicy peer that matches every address or every pod of the cluster: an empty peer, an ipBlock of
    a zero-length prefix, or an empty namespaceSelector without a podSelector that narrows it."""
    if not isinstance(peer, dict) or not peer:
        return True
    block = peer.get("ipBlock")
    if block is not None:
        try:
            return ipaddress.ip_network(str(block.get("cidr")), strict=False).prefixlen == 0
        except ValueError:
            return True
    namespaces, pods = peer.get("namespaceSelector"), peer.get("podSelector")
    return namespaces is not None and not namespaces and not pods


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def _container_checks(p: Problems, where: str, c: dict[str, Any], pod_sc: dict[str, Any]) -> None:
    sc = c.get("securityContext", {})
    at = f"{where} container {c['name']}"
    p.check(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, at, "runAsNonRoot must be true")
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    p.check(isinstance(uid, int) and uid > 0, at, "runAsUser must be a numeric non-root UID")
    p.check(sc.get("allowPrivilegeEscalation") is False, at, "allowPrivilegeEscalation must be false")
    p.check(sc.get("readOnlyRootFilesystem") is True, at, "readOnlyRootFilesystem must be true")
    caps = sc.get("capabilities", {})
    p.check(caps.get("drop") == ["ALL"] and not caps.get("add"), at, "capabilities must drop ALL and add none")
    p.check(sc.get("privileged") is not True, at, "must not be privileged")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    p.check(seccomp.get("type") == "RuntimeDefault", at, "seccompProfile must be RuntimeDefault")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            p.check(r in res.get(kind, {}), at, f"resources.{kind}.{r} must be set")


def _http_probe(c: dict[str, Any], probe: str) -> tuple[str | None, Any]:
    get = c.get(probe, {}).get("httpGet", {})
    return get.get("path"), get.get("port")


def pod(rendered: str, outdir: str) -> int:
    docs = load_all(rendered)
    p = Problems()
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    p.check(len(deployments) == 1, rendered, f"expected one Deployment, found {len(deployments)}")
    if p.items:
        return report(p)
    dep = deployments[0]
    where = f"{rendered}: {name_of(dep)}"
    spec = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    pod_sc = spec.get("securityContext", {})
    p.check(pod_sc.get("runAsNonRoot") is True, where, "pod securityContext.runAsNonRoot must be true")
    p.check(pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where, "pod seccomp RuntimeDefault")
    p.check(spec.get("automountServiceAccountToken") is False, where, "automountServiceAccountToken must be false")
    for key in ("shareProcessNamespace", "hostNetwork", "hostPID", "hostIPC"):
        p.check(spec.get(key) is not True, where, f"{key} must not be true")

    inits, mains = spec.get("initContainers", []), spec.get("containers", [])
    for c in inits + mains:
        _container_checks(p, where, c, pod_sc)
    names = [c["name"] for c in inits]
    if PEP_CONTAINER not in names:
        p.check(False, where, f"no init container named {PEP_CONTAINER!r} (the PEP as a native sidecar)")
        return report(p)
    pep = inits[names.index(PEP_CONTAINER)]
    p.check(pep.get("restartPolicy") == "Always", where, "the pep init container needs restartPolicy Always")
    p.check(mains != [], where, "no main container (the agent)")

    # The config: --config PATH, PATH in a ConfigMap volume mounted into the pep container.
    args = pep.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args else None
    p.check(config_path is not None, where, "the pep container's args need --config PATH")
    if config_path is None:
        return report(p)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = pep.get("volumeMounts", [])

    def mounted(path: str) -> tuple[dict[str, Any], str] | None:
        for m in mounts:
            base = m["mountPath"].rstrip("/") + "/"
            if path.startswith(base) and "subPath" not in m:
                return volumes[m["name"]], path[len(base) :]
        return None

    found = mounted(config_path)
    p.check(found is not None and "configMap" in found[0], where, f"{config_path} is not in a ConfigMap volume")
    if found is None or "configMap" not in found[0]:
        return report(p)
    cm_name, key = found[0]["configMap"]["name"], found[1]
    cms = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name]
    p.check(len(cms) == 1 and key in cms[0].get("data", {}), where, f"ConfigMap {cm_name} has no key {key}")
    if p.items:
        return report(p)
    config = yaml.safe_load(cms[0]["data"][key])

    # Listeners: the proxy on loopback (only this pod reaches it), the admin port is the container port the
    # probes and the PodMonitor use.
    listen_host, _ = _split_hostport(config["listen"])
    p.check(_is_loopback(listen_host), where, f"listen {config['listen']} should be a loopback address")
    _, admin_port = _split_hostport(config.get("admin_listen", "127.0.0.1:9901"))
    ports = {pt.get("name"): pt["containerPort"] for pt in pep.get("ports", [])}
    admin_names = [n for n, v in ports.items() if v == admin_port]
    p.check(len(admin_names) == 1, where, f"the pep container needs one named port {admin_port} (admin_listen)")
    admin_name = admin_names[0] if admin_names else None
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        got = _http_probe(pep, probe)
        p.check(
            got[0] == path and got[1] in (admin_name, admin_port),
            where,
            f"pep {probe} must be GET {path} on the admin port, got {got}",
        )

    # The PDP on loopback means a sidecar that starts before the PEP.
    pdp_url = config["pdp"].get("url")
    if pdp_url:
        host = pdp_url.split("://", 1)[1].split("/", 1)[0].rpartition(":")[0] or pdp_url
        if _is_loopback(host):
            before = inits[: names.index(PEP_CONTAINER)]
            p.check(
                any(c.get("restartPolicy") == "Always" and "startupProbe" in c for c in before),
                where,
                "pdp.url is on loopback: a sidecar with a startupProbe must start before the pep container",
            )

    # Credentials: each value_file in a Secret volume of the pep container (with that key), and no other
    # container mounting any Secret.
    secret_volumes = {n for n, v in volumes.items() if "secret" in v}
    for c in inits + mains:
        if c is not pep:
            shared = [m["name"] for m in c.get("volumeMounts", []) if m["name"] in secret_volumes]
            p.check(not shared, where, f"container {c['name']} mounts Secret volume(s) {shared}")
    out = Path(outdir)
    (out / "secrets").mkdir(parents=True, exist_ok=True)
    stand_ins: dict[str, Path] = {}

    def find_files(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "value_file" and isinstance(v, str):
                    found = mounted(v)
                    ok = found is not None and "secret" in found[0]
                    p.check(ok, where, f"{path}.value_file {v} is not in a Secret volume of the pep container")
                    if found is not None and ok:
                        items = found[0]["secret"].get("items")
                        p.check(
                            items is None or any(i["path"] == found[1] for i in items),
                            where,
                            f"{path}.value_file {v}: the Secret volume has no item {found[1]}",
                        )
                    stand_ins[v] = out / "secrets" / posixpath.basename(v)
                else:
                    find_files(v, f"{path}.{k}" if path else k)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                find_files(v, f"{path}[{i}]")

    find_files(config, "")
    log = config.get("decision_log", {})
    if log.get("sink") == "file":
        stand_ins[log["path"]] = out / "decisions.jsonl"
    # The text the pod gets, with only those paths replaced.
    text = cms[0]["data"][key]
    for original, dummy in stand_ins.items():
        if dummy.parent.name == "secrets":
            dummy.write_text(TOKEN_STAND_IN, encoding="utf-8")
            dummy.chmod(0o600)  # as the Secret volume's mode: pep check warns about a credential anyone may read
        text = text.replace(original, str(dummy))

    # The PodMonitor scrapes the admin port of these pods; the NetworkPolicy selects them and admits that port.
    for d in docs:
        sel = d.get("spec", {}).get("selector", {}).get("matchLabels", {})
        if d.get("kind") == "PodMonitor":
            p.check(sel.items() <= labels.items(), where, f"{name_of(d)} selector does not match the pod")
            eps = d["spec"].get("podMetricsEndpoints", [])
            p.check(
                any(e.get("port") == admin_name and e.get("path", "/metrics") == "/metrics" for e in eps),
                where,
                f"{name_of(d)} does not scrape /metrics on port {admin_name}",
            )
        if d.get("kind") == "NetworkPolicy":
            psel = d["spec"].get("podSelector", {}).get("matchLabels", {})
            p.check(psel.items() <= labels.items(), where, f"{name_of(d)} does not select the pod")
            p.check(
                {"Ingress", "Egress"} <= set(d["spec"].get("policyTypes", [])),
                where,
                f"{name_of(d)} must restrict Ingress and Egress",
            )
            ingress_ports = {pt.get("port") for r in d["spec"].get("ingress", []) for pt in r.get("ports", [])}
            p.check(
                ingress_ports <= {admin_port, admin_name},
                where,
                f"{name_of(d)} admits ports {ingress_ports}: only the admin port should be reachable",
            )
            # Kubernetes reads a missing or empty `from`/`to` as every peer and missing `ports` as every port:
            # such a rule (or a peer that selects everything) would open the pod, the agent included.
            for direction, peers in (("ingress", "from"), ("egress", "to")):
                for i, rule in enumerate(d["spec"].get(direction) or []):
                    at = f"{name_of(d)} {direction}[{i}]"
                    p.check(bool(rule.get("ports")), where, f"{at} lists no ports: it allows every port")
                    listed = rule.get(peers) or []
                    p.check(bool(listed), where, f"{at} lists no {peers!r}: it allows every peer")
                    for peer in listed:
                        p.check(not _open_peer(peer), where, f"{at} has a peer that selects everything: {peer}")

    (out / "config.yaml").write_text(text, encoding="utf-8")
    if p.items:
        return report(p)
    print(
        f"{where}: pod checks passed ({len(inits) + len(mains)} containers); "
        f"config from ConfigMap {cm_name} key {key} -> {out / 'config.yaml'}"
    )
    for original, dummy in stand_ins.items():
        print(f"  stand-in for pep check: {original} -> {dummy}")
    return 0


def report(p: Problems) -> int:
    for item in p.items:
        print(item, file=sys.stderr)
    return 1 if p.items else 0


def rules(source: str, out: str) -> int:
    docs = load_all(source)
    found = [d for d in docs if d.get("kind") == "PrometheusRule"]
    if len(found) != 1:
        print(f"{source}: expected one PrometheusRule, found {len(found)}", file=sys.stderr)
        return 1
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(found[0]["spec"], f, sort_keys=False)
    return 0


def main(argv: list[str]) -> int:
    commands: dict[str, tuple[Callable[..., int], int]] = {"split": (split, 3), "pod": (pod, 2), "rules": (rules, 2)}
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    func, _ = commands[argv[0]]
    return func(*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Properties of the rendered manifests that a schema cannot see.

Run by ../check, which renders every target with kubectl kustomize into the
directory named by $HANDS_K8S_RENDERED (one TARGET.yaml per target) and then runs
`python3 -m unittest` here. Each test reads the rendered objects, never the source
files, so it checks what a cluster would receive; the configuration files inside
the ConfigMaps are parsed as TOML.
"""

import functools
import json
import os
import re
import tomllib
import unittest
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KUBERNETES = HERE.parent
REPO = KUBERNETES.parent.parent
RENDERED = Path(os.environ.get("HANDS_K8S_RENDERED", ""))

# cert-manager's KeyUsage values (cert-manager.io/v1 Certificate spec.usages).
CERT_MANAGER_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment",
    "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
    "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
    "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}

# What the least-privileged worker may hold, each checked by ../check's worker run.
LEAST_CAPS = {
    "SYS_ADMIN", "NET_ADMIN", "NET_BIND_SERVICE", "SETUID", "SETGID", "SETPCAP",
    "KILL", "DAC_OVERRIDE",
}

# System calls the worker or its sessions make that the container's seccomp profile
# must leave alone.
WORKER_SYSCALLS = {
    "mount", "umount2", "pivot_root", "unshare", "setns", "clone", "clone3",
    "open_tree", "move_mount", "mount_setattr", "sethostname", "seccomp",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    "prctl", "capset", "setresuid", "setresgid", "setgroups", "ioctl", "kill",
    "execve", "socket", "bind", "flock",
}

WORKER_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@functools.lru_cache(maxsize=None)
def load(target):
    path = RENDERED / f"{target}.yaml"
    with open(path) as f:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return [d for d in yaml.load_all(f, Loader=loader) if d]


def targets():
    if not RENDERED.is_dir():
        raise unittest.SkipTest("HANDS_K8S_RENDERED is not set: run ../check")
    return sorted(p.stem for p in RENDERED.glob("*.yaml"))


class Render:
    """The objects of one rendered target, with lookups."""

    def __init__(self, target):
        self.target = target
        self.docs = load(target)

    def all(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind, name=None):
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        if len(found) != 1:
            raise AssertionError(f"{self.target}: {len(found)} {kind} named {name}")
        return found[0]

    def workloads(self):
        return [d for d in self.docs if d["kind"] in ("DaemonSet", "StatefulSet", "Deployment")]

    def worker(self):
        return self.one("DaemonSet", "hands-worker")

    def gateway(self):
        return self.one("StatefulSet", "hands-gateway")

    def config(self, workload, volume):
        """The TOML file of the ConfigMap that `workload` mounts as `volume`."""
        vol = volume_named(workload, volume)
        cm = self.one("ConfigMap", vol["configMap"]["name"])
        (text,) = cm["data"].values()
        return tomllib.loads(text)

    def worker_toml(self):
        return self.config(self.worker(), "config")

    def gateway_toml(self):
        return self.config(self.gateway(), "config")


def pod(workload):
    return workload["spec"]["template"]["spec"]


def container(workload, name=None):
    cs = pod(workload)["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def volume_named(workload, name):
    return next(v for v in pod(workload)["volumes"] if v["name"] == name)


def mount_of(workload, volume):
    return next(m for m in container(workload)["volumeMounts"] if m["name"] == volume)


def port_number(workload, name):
    for c in pod(workload)["containers"]:
        for p in c.get("ports", []):
            if p.get("name") == name:
                return p["containerPort"]
    raise AssertionError(f"{workload['metadata']['name']} has no port named {name}")


def listen_port(address):
    return int(address.rsplit(":", 1)[1])


def selects(selector, labels):
    """Whether a label selector (matchLabels and matchExpressions) selects `labels`."""
    if selector is None:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        pairs = selector.get("matchLabels", {})
    else:  # a Service's selector: a plain label map
        pairs = selector
    if not all(labels.get(k) == v for k, v in pairs.items()):
        return False
    for e in selector.get("matchExpressions", []):
        have = e["key"] in labels
        if e["operator"] == "In" and (not have or labels[e["key"]] not in e["values"]):
            return False
        if e["operator"] == "NotIn" and have and labels[e["key"]] in e["values"]:
            return False
        if e["operator"] == "Exists" and not have:
            return False
        if e["operator"] == "DoesNotExist" and have:
            return False
    return True


def pod_labels(workload):
    return workload["spec"]["template"]["metadata"]["labels"]


def file_in_mounts(workload, path, kind):
    """The (volume, key) of `kind` ('secret' or 'configMap') that provides `path`."""
    for m in container(workload)["volumeMounts"]:
        base = m["mountPath"].rstrip("/") + "/"
        if m.get("subPath") and path == m["mountPath"]:
            vol = volume_named(workload, m["name"])
            if kind in vol:
                return vol, m["subPath"]
        if path.startswith(base) and not m.get("subPath"):
            vol = volume_named(workload, m["name"])
            if kind in vol:
                return vol, path[len(base):]
    raise AssertionError(f"{path} is in no {kind} mounted by {workload['metadata']['name']}")


class EveryTarget(unittest.TestCase):
    """Run each check on every rendered target (the base and each overlay)."""

    target = None

    def each(self):
        # One failure per test, naming the target it was found in (a subTest
        # cannot wrap the body of the caller's loop).
        for t in targets():
            self.target = t
            yield Render(t)
        self.target = None

    def _formatMessage(self, msg, standardMsg):
        text = super()._formatMessage(msg, standardMsg)
        return f"[{self.target}] {text}" if self.target else text


class Pki(EveryTarget):
    def certificates(self, r):
        return {c["metadata"]["name"]: c["spec"] for c in r.all("Certificate")}

    def test_usages_are_cert_managers_and_right_for_each_side(self):
        for r in self.each():
            certs = self.certificates(r)
            for name, spec in certs.items():
                self.assertLessEqual(set(spec.get("usages", [])), CERT_MANAGER_USAGES, name)
            gw = set(certs["hands-gateway"]["usages"])
            self.assertLessEqual({"server auth", "digital signature", "key encipherment"}, gw)
            self.assertNotIn("client auth", gw)
            wk = set(certs["hands-worker"]["usages"])
            self.assertIn("client auth", wk)
            self.assertNotIn("server auth", wk)
            self.assertTrue(certs["hands-ca"].get("isCA"))
            self.assertIn("cert sign", certs["hands-ca"]["usages"])

    def test_chain_selfsigned_to_ca_to_leaves(self):
        for r in self.each():
            certs = self.certificates(r)
            issuers = {i["metadata"]["name"]: i["spec"] for i in r.all("Issuer")}
            ca_issuer_ref = certs["hands-ca"]["issuerRef"]
            self.assertIn("selfSigned", issuers[ca_issuer_ref["name"]])
            for leaf in ("hands-gateway", "hands-worker"):
                ref = certs[leaf]["issuerRef"]
                self.assertEqual(ref.get("kind", "Issuer"), "Issuer")
                self.assertEqual(
                    issuers[ref["name"]]["ca"]["secretName"], certs["hands-ca"]["secretName"]
                )

    def test_worker_identity_is_in_its_certificate_and_allowed(self):
        for r in self.each():
            wid = r.worker_toml()["worker_id"]
            self.assertRegex(wid, WORKER_ID_RE)
            spec = self.certificates(r)["hands-worker"]
            self.assertIn(f"urn:hands:worker:{wid}", spec.get("uris", []))
            self.assertEqual(spec.get("commonName", wid), wid)
            allowed = r.gateway_toml()["tunnel"].get("allowed_workers")
            if allowed is not None:
                self.assertIn(wid, allowed)

    def test_gateway_certificate_carries_the_name_workers_verify(self):
        for r in self.each():
            name = r.worker_toml()["tunnel"]["server_name"]
            self.assertIn(name, self.certificates(r)["hands-gateway"]["dnsNames"])

    def test_every_mounted_secret_and_configmap_exists(self):
        for r in self.each():
            made = {s["metadata"]["name"] for s in r.all("Secret")}
            made |= {c["secretName"] for c in self.certificates(r).values()}
            maps = {c["metadata"]["name"] for c in r.all("ConfigMap")}
            for w in r.workloads():
                for v in pod(w)["volumes"]:
                    if "secret" in v:
                        self.assertIn(v["secret"]["secretName"], made, v["name"])
                    if "configMap" in v:
                        self.assertIn(v["configMap"]["name"], maps, v["name"])

    def test_tls_files_come_from_the_certificate_secrets(self):
        for r in self.each():
            certs = {c["secretName"] for c in self.certificates(r).values()}
            for w, cfg in ((r.worker(), r.worker_toml()), (r.gateway(), r.gateway_toml())):
                for key, want in (("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key")):
                    vol, file = file_in_mounts(w, cfg["tunnel"][key], "secret")
                    self.assertEqual(file, want, key)
                    self.assertIn(vol["secret"]["secretName"], certs)

    def test_token_and_environment_key_files_are_mounted_secrets(self):
        for r in self.each():
            vol, key = file_in_mounts(r.gateway(), r.gateway_toml()["api"]["token_file"], "secret")
            token = r.one("Secret", vol["secret"]["secretName"])
            self.assertIn(key, token["data"])
            # worker.toml's [anthropic] table may be commented out; its key file
            # line must name the mounted Secret's file either way.
            cm = r.one("ConfigMap", volume_named(r.worker(), "config")["configMap"]["name"])
            text = cm["data"]["worker.toml"]
            m = re.search(r'^#?\s*environment_key_file\s*=\s*"([^"]+)"', text, re.M)
            self.assertIsNotNone(m, "worker.toml names no environment_key_file")
            vol, key = file_in_mounts(r.worker(), m.group(1), "secret")
            self.assertIn(key, r.one("Secret", vol["secret"]["secretName"])["data"])


class Worker(EveryTarget):
    def test_termination_grace_exceeds_the_drain(self):
        for r in self.each():
            grace = r.worker_toml().get("shutdown_grace_secs", 20)
            period = pod(r.worker())["terminationGracePeriodSeconds"]
            self.assertGreater(period, grace + 10)

    def test_no_host_namespaces(self):
        for r in self.each():
            for w in r.workloads():
                for field in ("hostNetwork", "hostPID", "hostIPC"):
                    self.assertFalse(pod(w).get(field, False), f"{w['metadata']['name']} {field}")

    def test_probes_use_the_configured_listeners(self):
        for r in self.each():
            w = r.worker()
            metrics = listen_port(r.worker_toml()["metrics"]["listen"])
            c = container(w)
            paths = {}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = c[probe]["httpGet"]
                self.assertEqual(port_number(w, get["port"]), metrics, probe)
                paths[probe] = get["path"]
            self.assertEqual(paths["readinessProbe"], "/readyz")
            self.assertEqual(paths["livenessProbe"], "/livez")
            g = r.gateway()
            gcfg = r.gateway_toml()
            self.assertNotRegex(gcfg["api"]["listen"], r"^(127\.|\[::1\]|localhost)")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = container(g)[probe]["httpGet"]
                self.assertEqual(port_number(g, get["port"]), listen_port(gcfg["api"]["listen"]))
                self.assertEqual(get["path"], "/healthz")
            self.assertEqual(port_number(g, "tunnel"), listen_port(gcfg["tunnel"]["listen"]))

    def test_rolling_update_one_node_at_a_time_without_surge(self):
        for r in self.each():
            s = r.worker()["spec"]["updateStrategy"]
            self.assertEqual(s["type"], "RollingUpdate")
            self.assertIn("maxUnavailable", s["rollingUpdate"])
            self.assertIn(s["rollingUpdate"].get("maxSurge", 0), (0, "0", "0%"))

    def test_priority_class_is_our_own(self):
        for r in self.each():
            for w in r.workloads():
                name = pod(w)["priorityClassName"]
                self.assertFalse(name.startswith("system-"), name)
                pc = r.one("PriorityClass", name)
                self.assertLess(pc["value"], 1_000_000_000)
                self.assertFalse(pc.get("globalDefault", False))

    def test_no_service_account_token(self):
        for r in self.each():
            for w in r.workloads():
                spec = pod(w)
                self.assertIs(spec.get("automountServiceAccountToken"), False)
                sa = r.one("ServiceAccount", spec["serviceAccountName"])
                self.assertIs(sa.get("automountServiceAccountToken"), False)

    def test_tolerations_are_named_not_blanket(self):
        for r in self.each():
            for t in pod(r.worker()).get("tolerations", []):
                self.assertTrue(t.get("key"), f"a toleration of every taint: {t}")
                self.assertNotIn("node-role.kubernetes.io/control-plane", t["key"])

    def test_secrets_are_unreadable_to_sessions(self):
        # Sessions see the image's /etc (mounts included) as other uids: every Secret
        # the worker mounts must be readable by its owner, root, alone.
        for r in self.each():
            w = r.worker()
            for v in pod(w)["volumes"]:
                if "secret" in v:
                    mode = v["secret"].get("defaultMode", 0o644)
                    self.assertEqual(mode & 0o077, 0, f"{v['name']} mode {oct(mode)}")
                    for item in v["secret"].get("items", []):
                        self.assertEqual(item.get("mode", mode) & 0o077, 0)

    def test_state_and_data_directories(self):
        for r in self.each():
            w = r.worker()
            for path in ("/var/lib/hands", "/run/hands"):
                m = next(m for m in container(w)["volumeMounts"] if m["mountPath"] == path)
                vol = volume_named(w, m["name"])
                self.assertEqual(vol["hostPath"]["path"], path)
                self.assertEqual(vol["hostPath"]["type"], "DirectoryOrCreate")
            audit = r.worker_toml().get("audit", {}).get("file", "/var/lib/hands/audit.jsonl")
            self.assertTrue(audit.startswith("/var/lib/hands/"), audit)


class Tunnel(EveryTarget):
    def test_workers_dial_every_gateway_replica(self):
        for r in self.each():
            g = r.gateway()
            svc = r.one("Service", g["spec"]["serviceName"])
            self.assertEqual(svc["spec"].get("clusterIP"), "None")
            self.assertTrue(selects(svc["spec"]["selector"], pod_labels(g)))
            port = port_number(g, "tunnel")
            want = {
                f"{g['metadata']['name']}-{i}.{svc['metadata']['name']}:{port}"
                for i in range(g["spec"]["replicas"])
            }
            self.assertEqual(set(r.worker_toml()["tunnel"]["endpoints"]), want)

    def test_gateway_replicas_spread_and_budgeted(self):
        for r in self.each():
            g = r.gateway()
            self.assertGreaterEqual(g["spec"]["replicas"], 2)
            pdbs = [p for p in r.all("PodDisruptionBudget") if selects(p["spec"]["selector"], pod_labels(g))]
            self.assertEqual(len(pdbs), 1)
            spec = pdbs[0]["spec"]
            if "minAvailable" in spec:
                self.assertLess(int(spec["minAvailable"]), g["spec"]["replicas"])
            spread = pod(g).get("topologySpreadConstraints", [])
            hard = [
                s for s in spread
                if s["topologyKey"] == "kubernetes.io/hostname"
                and s["whenUnsatisfiable"] == "DoNotSchedule"
                and selects(s["labelSelector"], pod_labels(g))
            ]
            anti = pod(g).get("affinity", {}).get("podAntiAffinity", {})
            self.assertTrue(hard or anti.get("requiredDuringSchedulingIgnoredDuringExecution"))

    def test_gateway_hardening(self):
        for r in self.each():
            g = r.gateway()
            psc = pod(g).get("securityContext", {})
            self.assertTrue(psc.get("runAsNonRoot"))
            self.assertNotEqual(psc.get("runAsUser"), 0)
            self.assertEqual(psc.get("seccompProfile", {}).get("type"), "RuntimeDefault")
            for c in pod(g)["containers"]:
                sc = c["securityContext"]
                self.assertIs(sc["allowPrivilegeEscalation"], False)
                self.assertIs(sc["readOnlyRootFilesystem"], True)
                self.assertFalse(sc.get("privileged", False))
                self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                self.assertFalse(sc["capabilities"].get("add"))
            # Its keys are readable through its group alone.
            for v in pod(g)["volumes"]:
                if "secret" in v:
                    self.assertEqual(v["secret"]["defaultMode"] & 0o007, 0)
                    self.assertTrue(v["secret"]["defaultMode"] & 0o040 and psc.get("fsGroup"))

    def test_every_container_has_requests_and_limits(self):
        for r in self.each():
            for w in r.workloads():
                for c in pod(w)["containers"] + pod(w).get("initContainers", []):
                    res = c.get("resources", {})
                    for k in ("cpu", "memory"):
                        self.assertIn(k, res.get("limits", {}), f"{c['name']} limits.{k}")
                        self.assertIn(k, res.get("requests", {}), f"{c['name']} requests.{k}")

    def test_images_are_pinned(self):
        for r in self.each():
            for w in r.workloads():
                for c in pod(w)["containers"]:
                    image = c["image"]
                    self.assertRegex(image, r"(:[A-Za-z0-9_.-]+|@sha256:[0-9a-f]{64})$")
                    self.assertFalse(image.endswith(":latest"), image)


class Network(EveryTarget):
    def policy_for(self, r, workload):
        found = [
            p for p in r.all("NetworkPolicy")
            if selects(p["spec"]["podSelector"], pod_labels(workload))
        ]
        self.assertEqual(len(found), 1, workload["metadata"]["name"])
        return found[0]["spec"]

    def test_gateway_policy(self):
        for r in self.each():
            g, w = r.gateway(), r.worker()
            spec = self.policy_for(r, g)
            self.assertEqual(set(spec["policyTypes"]), {"Ingress", "Egress"})
            # Ingress: named ports that exist on the gateway; the tunnel only from
            # the worker pods.
            tunnel_rules = []
            for rule in spec["ingress"]:
                for p in rule["ports"]:
                    port_number(g, p["port"])
                    if p["port"] in ("tunnel", port_number(g, "tunnel")):
                        tunnel_rules.append(rule)
            self.assertTrue(tunnel_rules)
            for rule in tunnel_rules:
                for peer in rule["from"]:
                    self.assertNotIn("ipBlock", peer)
                    self.assertTrue(selects(peer.get("podSelector"), pod_labels(w)))
            # Egress: DNS alone.
            for rule in spec["egress"]:
                self.assertEqual({p["port"] for p in rule["ports"]}, {53})

    def test_worker_policy_admits_only_metrics(self):
        for r in self.each():
            w = r.worker()
            spec = self.policy_for(r, w)
            for rule in spec["ingress"]:
                for p in rule["ports"]:
                    self.assertEqual(port_number(w, p["port"]) if isinstance(p["port"], str) else p["port"],
                                     listen_port(r.worker_toml()["metrics"]["listen"]))

    def test_servicemonitors_select_services_with_their_ports(self):
        for r in self.each():
            monitors = r.all("ServiceMonitor")
            self.assertEqual(len(monitors), 2)
            scraped = set()
            for sm in monitors:
                ns = sm["metadata"].get("namespace")
                services = [
                    s for s in r.all("Service")
                    if s["metadata"].get("namespace") == ns
                    and selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))
                ]
                self.assertTrue(services, f"{sm['metadata']['name']} selects no Service")
                for ep in sm["spec"]["endpoints"]:
                    with_port = [s for s in services if ep["port"] in {p.get("name") for p in s["spec"]["ports"]}]
                    self.assertEqual(len(with_port), 1, f"{sm['metadata']['name']} port {ep['port']}")
                    svc = with_port[0]
                    port = next(p for p in svc["spec"]["ports"] if p["name"] == ep["port"])
                    backends = [x for x in r.workloads() if selects(svc["spec"]["selector"], pod_labels(x))]
                    self.assertEqual(len(backends), 1)
                    self.assertIsInstance(port_number(backends[0], port["targetPort"]), int)
                    scraped.add(backends[0]["metadata"]["name"])
            self.assertEqual(scraped, {"hands-worker", "hands-gateway"})


class LeastPrivileged(unittest.TestCase):
    def setUp(self):
        if "least-privileged" not in targets():
            self.fail("the least-privileged overlay was not rendered")
        self.r = Render("least-privileged")
        self.w = self.r.worker()
        self.sc = container(self.w)["securityContext"]

    def test_not_privileged_named_capabilities(self):
        self.assertIs(self.sc["privileged"], False)
        self.assertEqual(self.sc["capabilities"]["drop"], ["ALL"])
        self.assertEqual(set(self.sc["capabilities"]["add"]), LEAST_CAPS)

    def test_no_host_devices_or_host_namespaces(self):
        for v in pod(self.w)["volumes"]:
            self.assertNotEqual(v.get("hostPath", {}).get("path"), "/dev")
            self.assertNotEqual(v.get("hostPath", {}).get("path"), "/sys/fs/cgroup")
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            self.assertFalse(pod(self.w).get(field, False))

    def test_seccomp_and_apparmor(self):
        prof = self.sc["seccompProfile"]
        self.assertEqual(prof["type"], "Localhost")
        self.assertEqual(prof["localhostProfile"], "hands/worker.json")
        self.assertEqual(self.sc["appArmorProfile"]["type"], "Unconfined")
        ann = self.w["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(ann["container.apparmor.security.beta.kubernetes.io/worker"], "unconfined")

    def test_seccomp_profile_denies_only_what_no_one_needs(self):
        path = KUBERNETES / "overlays/least-privileged/seccomp/hands-worker.json"
        prof = json.loads(path.read_text())
        self.assertEqual(prof["defaultAction"], "SCMP_ACT_ALLOW")
        denied = set()
        for rule in prof["syscalls"]:
            self.assertEqual(rule["action"], "SCMP_ACT_ERRNO")
            denied |= set(rule["names"])
        self.assertFalse(denied & WORKER_SYSCALLS, denied & WORKER_SYSCALLS)
        self.assertLessEqual({"bpf", "kexec_load", "init_module", "open_by_handle_at", "keyctl"}, denied)

    def test_cgroup_is_remounted_writable_before_hands_starts(self):
        cmd = container(self.w)["command"]
        self.assertEqual(cmd[:2], ["/bin/sh", "-c"])
        self.assertRegex(cmd[2], r"^mount -o remount,bind,rw /sys/fs/cgroup && exec /usr/local/bin/hands \"\$@\"$")
        self.assertEqual(container(self.w)["args"][0], "worker")

    def test_policies_differ_from_the_built_in_ones_only_in_workspace_disk(self):
        cm = self.r.one("ConfigMap", volume_named(self.w, "policies")["configMap"]["name"])
        self.assertTrue(cm["data"])
        for name, text in cm["data"].items():
            shipped = (REPO / "policies" / name).read_text()

            def code(t):
                return [l for l in t.splitlines() if l.strip() and not l.lstrip().startswith("#")]

            ours, theirs = code(text), code(shipped)
            self.assertEqual(ours[:-1], theirs[:-1], name)
            self.assertEqual(theirs[-1], "allow_degraded = []", name)
            self.assertEqual(ours[-1], 'allow_degraded = ["workspace-disk"]', name)


class Base(unittest.TestCase):
    def test_base_is_the_privileged_variant(self):
        if "base" not in targets():
            self.fail("the base was not rendered")
        w = Render("base").worker()
        self.assertIs(container(w)["securityContext"]["privileged"], True)


if __name__ == "__main__":
    unittest.main()

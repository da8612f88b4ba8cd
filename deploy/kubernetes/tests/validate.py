"""Validates rendered manifests against the Kubernetes JSON schemas, offline.

Usage: validate.py VERSION FILE...   (VERSION like 1.30.0; repeat the call per version)

Every object of a built-in kind must validate against kubernetes-validate's strict
schemas (unknown fields rejected), which ship inside the wheel: no network. An object
with no built-in schema must be one of the custom resources this deployment uses
(their contents are checked by test_manifests.py); anything else fails, so a typo in
a built-in's apiVersion cannot pass as an "unknown custom resource".
"""

import sys

import kubernetes_validate.utils as kv
import yaml

CUSTOM = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}


def main() -> int:
    version, files = sys.argv[1], sys.argv[2:]
    failed = checked = custom = 0
    for name in files:
        with open(name) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                kv.validate(doc, version, strict=True)
                checked += 1
            except kv.SchemaNotFoundError:
                if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM:
                    custom += 1
                else:
                    print(f"FAIL {what}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
                    failed += 1
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                print(f"FAIL {what} (Kubernetes {e.version}): {path}: {e.message}")
                failed += 1
    print(
        f"schemas {version}: {checked} built-in objects valid (strict), "
        f"{custom} custom resources left to the tests, {failed} invalid"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

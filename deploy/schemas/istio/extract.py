"""Extracts the openAPIV3Schema of the Istio CRDs this project uses from Istio's released
crd-all.gen.yaml into one JSON file per kind (see README.md next to this file).

    .venv/bin/python deploy/schemas/istio/extract.py crd-all.gen.yaml ISTIO_VERSION

Needs PyYAML (installed in .venv by `cargo xtask setup` with kubernetes-validate).
"""

import json
import pathlib
import sys

import yaml

KINDS = [
    "AuthorizationPolicy",
    "DestinationRule",
    "EnvoyFilter",
    "Gateway",
    "PeerAuthentication",
    "ServiceEntry",
    "Sidecar",
    "VirtualService",
    "WasmPlugin",
]


def main() -> None:
    source, version = sys.argv[1], sys.argv[2]
    out_dir = pathlib.Path(__file__).parent
    with open(source, encoding="utf-8") as f:
        crds = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition"]
    found = set()
    for crd in crds:
        kind = crd["spec"]["names"]["kind"]
        if kind not in KINDS:
            continue
        found.add(kind)
        versions = {}
        for v in crd["spec"]["versions"]:
            versions[v["name"]] = {
                "served": bool(v.get("served")),
                "storage": bool(v.get("storage")),
                "openAPIV3Schema": v["schema"]["openAPIV3Schema"],
            }
        doc = {
            "istio_version": version,
            "source": f"https://github.com/istio/istio/blob/{version}/manifests/charts/base/files/crd-all.gen.yaml",
            "crd": crd["metadata"]["name"],
            "group": crd["spec"]["group"],
            "kind": kind,
            "versions": versions,
        }
        path = out_dir / f"{kind}.json"
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    missing = set(KINDS) - found
    if missing:
        sys.exit(f"not in {source}: {sorted(missing)}")


if __name__ == "__main__":
    main()

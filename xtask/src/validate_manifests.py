"""Schema validation of the objects `cargo xtask check-deploy` rendered from deploy/.

Run by xtask (xtask/src/schemas.rs) with the project venv's Python:

    python validate_manifests.py INPUT.json

INPUT.json: {"kubernetes_version": "1.33.0", "istio_schema_dir": "...",
             "objects": [{"file": "deploy/...", "object": {...}}, ...]}

- Kubernetes objects: the PyPI package kubernetes-validate, strict mode (unknown fields are
  errors, as with `kubectl apply`'s default server-side strict field validation), against the
  schemas of the given Kubernetes version.
- Istio objects: the openAPIV3Schema of Istio's CRDs (deploy/schemas/istio/<Kind>.json, see the
  README there) with the API server's structural-schema rules: unknown fields are errors unless
  `x-kubernetes-preserve-unknown-fields`, `nullable` admits null, `x-kubernetes-int-or-string`
  admits both. CEL rules (`x-kubernetes-validations`) are NOT evaluated.

Prints one line per problem, `<file>: <Kind> <namespace>/<name>: <field>: <message>`, and exits
1 if there was any; otherwise prints one summary line.
"""

import json
import pathlib
import re
import sys

import jsonschema
import kubernetes_validate

ISTIO_GROUP = re.compile(r"^[a-z.]+\.istio\.io$")
# API groups of Kubernetes itself: the core group, the unqualified built-in groups, *.k8s.io.
K8S_UNQUALIFIED = {"", "apps", "batch", "policy", "autoscaling"}


def field_path(path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def short(message: str, limit: int = 240) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def structural(schema, top=False):
    """A copy of a CRD schema with the API server's rules made explicit for jsonschema."""
    if not isinstance(schema, dict):
        return schema
    s = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            s[key] = {k: structural(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            s[key] = structural(value)
        elif key in ("oneOf", "anyOf", "allOf"):
            s[key] = [structural(v) for v in value]
        else:
            s[key] = value
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["type"] = ["integer", "string"]
    if s.pop("nullable", False) and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if top:
        props = dict(s.get("properties", {}))
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        s["properties"] = props
    if (
        s.get("type") == "object"
        and "properties" in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in s
    ):
        s["additionalProperties"] = False
    return s


def deepest(error):
    """For oneOf/anyOf failures, the most specific error inside (jsonschema's best match)."""
    while error.context:
        error = jsonschema.exceptions.best_match(error.context)
    return error


class Istio:
    def __init__(self, schema_dir: pathlib.Path):
        self.dir = schema_dir
        self.cache = {}
        self.count = 0

    def validate(self, obj, group: str, version: str):
        kind = obj.get("kind")
        path = self.dir / f"{kind}.json"
        if not path.is_file():
            return [("apiVersion", f"no vendored Istio CRD schema for kind {kind} ({path})")]
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc["group"] != group:
            return [("apiVersion", f"{kind} belongs to API group {doc['group']}, not {group}")]
        served = sorted(v for v, d in doc["versions"].items() if d["served"])
        if version not in served:
            return [
                (
                    "apiVersion",
                    f"{group}/{version} does not serve {kind} in Istio {doc['istio_version']} "
                    f"(served: {', '.join(group + '/' + v for v in served)})",
                )
            ]
        key = (kind, version)
        if key not in self.cache:
            schema = structural(doc["versions"][version]["openAPIV3Schema"], top=True)
            self.cache[key] = jsonschema.Draft7Validator(schema)
        self.count += 1
        problems = []
        for error in sorted(self.cache[key].iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            inner = deepest(error)
            problems.append((field_path(inner.absolute_path), short(inner.message)))
        return problems


def kubernetes(obj, k8s_version: str):
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        return [("apiVersion", short(e.message))]
    except kubernetes_validate.ValidationError as e:
        inner = deepest(e)
        return [(field_path(inner.absolute_path), short(inner.message))]
    return []


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        data = json.load(f)
    k8s_version = data["kubernetes_version"]
    istio = Istio(pathlib.Path(data["istio_schema_dir"]))
    k8s_count = 0
    lines = []
    for entry in data["objects"]:
        obj, file = entry["object"], entry["file"]
        kind = obj.get("kind", "?")
        meta = obj.get("metadata") or {}
        name = f"{meta.get('namespace', '')}/{meta.get('name', '?')}".lstrip("/")
        api = obj.get("apiVersion", "")
        group, _, version = api.rpartition("/")
        if not version:
            problems = [("apiVersion", "missing")]
        elif ISTIO_GROUP.match(group):
            problems = istio.validate(obj, group, version)
        elif group in K8S_UNQUALIFIED or group.endswith(".k8s.io"):
            k8s_count += 1
            problems = kubernetes(obj, k8s_version)
        else:
            problems = [("apiVersion", f"`{api}` is neither a Kubernetes nor an Istio API group")]
        for field, message in problems:
            lines.append(f"{file}: {kind} {name}: {field}: {message}")
    if lines:
        print("\n".join(lines))
        return 1
    print(
        f"{k8s_count} Kubernetes objects valid (Kubernetes {k8s_version} schemas, strict), "
        f"{istio.count} Istio objects valid (Istio CRD schemas)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

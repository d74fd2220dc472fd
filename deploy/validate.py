#!/usr/bin/env python3
"""Validates the Kubernetes manifests of deploy/ (Python 3, kubectl, kubernetes-validate, jsonschema).

    python3 deploy/validate.py                    # render and check the three kustomizations below
    python3 deploy/validate.py --files a.yaml -   # check these YAML files instead ('-': standard input)

Without --files it renders `kubectl kustomize` of deploy/, deploy/overlays/jaeger and
deploy/examples/shop. Every YAML document is then checked:
  - a trellis.dev custom resource (TrafficPolicy, ServerPolicy): against the openAPIV3Schema of its
    CRD in deploy/base/crds/, with jsonschema; an unknown field is an error, as with kubectl's
    default (strict) field validation. The CRD's CEL rules (x-kubernetes-validations) are not
    evaluated: only an API server does that.
  - anything else: with kubernetes-validate against the schemas of Kubernetes 1.33, strict
    (unknown fields are errors). For a CustomResourceDefinition that checks the object's shape
    only: the API server's own checks of the schema inside (structural schema, CEL compilation)
    are not made here.
YAML is read as Kubernetes reads it (YAML 1.1), so an unquoted key `on` becomes `true` here too.

Prints one line per document (`SOURCE: Kind/name: ok` or the error), then a summary. Exits 0 when
every document is valid, 1 naming each one that is not, 2 when kubectl or a Python module is
missing or a file cannot be read.
"""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:
    print(f"validate.py needs the Python module {e.name}: pip install kubernetes-validate jsonschema")
    sys.exit(2)

DEPLOY = Path(__file__).resolve().parent
KUSTOMIZATIONS = [DEPLOY, DEPLOY / "overlays" / "jaeger", DEPLOY / "examples" / "shop"]
CRD_DIR = DEPLOY / "base" / "crds"
KUBERNETES_VERSION = "1.33.0"
# metadata.name of a custom resource: a DNS subdomain, as the API server requires.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def strict(schema):
    """A CRD's OpenAPI schema as JSON Schema that, like strict field validation, refuses fields
    the schema does not declare (the API server would otherwise drop them silently)."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if "items" in out:
        out["items"] = strict(out["items"])
    return out


def load_crds():
    """{(apiVersion, kind): JSON Schema} for every served version of the CRDs in deploy/base/crds/."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                if version.get("served"):
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def field_path(parts):
    """jsonschema's path as people write it: spec.retries.on[2]."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def explain(error):
    """One error as `field: message`, with the field's description where the message alone is
    cryptic (a pattern, or the integer range of an int-or-string such as a duration's 0)."""
    message = error.message
    cryptic = error.validator == "pattern" or error.schema.get("x-kubernetes-int-or-string")
    if cryptic and error.schema.get("description"):
        message += f" ({error.schema['description']})"
    if error.validator == "additionalProperties" and any(k is True for k in error.instance):
        message += ' (a key `on` must be quoted as "on": Kubernetes reads YAML 1.1, where on is true)'
    return f"{field_path(error.absolute_path)}: {message}"


def check_custom_resource(doc, schema):
    """Every problem of a custom resource of ours, or an empty list."""
    problems = [explain(e) for e in sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    name = metadata(doc).get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        problems.insert(0, f"metadata.name: {name!r} is not a valid name (lower-case DNS subdomain)")
    return problems


def metadata(doc):
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) else {}


def describe(doc):
    """Kind/name of a document, as far as it has them."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    return f"{kind or '?'}/{metadata(doc).get('name', '?')}"


def check(doc, crds):
    """(problems, note) for one document."""
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        return ["not a Kubernetes object (apiVersion and kind are required)"], ""
    api_version, kind = doc["apiVersion"], doc["kind"]
    if api_version.split("/")[0] == "trellis.dev":
        schema = crds.get((api_version, kind))
        if schema is None:
            known = ", ".join(sorted(f"{a} {k}" for a, k in crds))
            return [f"{api_version} {kind} is not a served version of our CRDs ({known})"], ""
        return check_custom_resource(doc, schema), " (CRD schema; its CEL rules are not evaluated here)"
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{field_path(e.path)}: {e.message}"], ""
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message], ""
    if kind == "CustomResourceDefinition":
        return [], " (object only; structural-schema and CEL checks need an API server)"
    return [], ""


def sources(args):
    """(name, YAML text, error) for each thing to check; exits 2 when a file cannot be read."""
    if args.files:
        for f in args.files:
            try:
                yield ("<stdin>", sys.stdin.read(), None) if f == "-" else (f, Path(f).read_text(), None)
            except OSError as e:
                print(f"{f}: cannot read: {e}")
                sys.exit(2)
        return
    if shutil.which("kubectl") is None:
        print("validate.py needs kubectl (with kustomize) on PATH")
        sys.exit(2)
    for target in KUSTOMIZATIONS:
        name = str(target.relative_to(DEPLOY.parent))
        run = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True)
        if run.returncode == 0:
            yield name, run.stdout, None
        else:
            yield name, None, f"kubectl kustomize failed: {run.stderr.strip()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", metavar="FILE",
                        help="check these YAML files ('-': standard input) instead of the kustomizations")
    args = parser.parse_args()
    crds = load_crds()
    checked, failed = 0, 0
    for name, text, error in sources(args):
        if error is None:
            try:
                docs = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as e:
                error = f"not valid YAML: {e}"
        if error:
            print(f"{name}: {error}")
            failed += 1
            continue
        for doc in docs:
            checked += 1
            problems, note = check(doc, crds)
            label = f"{name}: {describe(doc)}"
            for p in problems:
                print(f"{label}: {p}")
            if not problems:
                print(f"{label}: ok{note}")
            failed += bool(problems)
    if failed:
        print(f"invalid: {failed}; documents checked: {checked}")
        return 1
    print(f"all {checked} document(s) valid (Kubernetes {KUBERNETES_VERSION[:4]} schemas, CRDs from deploy/base/crds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

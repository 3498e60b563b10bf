"""The CompressionJob CustomResourceDefinition, generated from the pipeline's spec model.

One source of truth: `krunch.spec.JobSpec` (pydantic) is what `krunch compress`
validates; this module turns its JSON schema into the structural OpenAPI v3
schema Kubernetes wants (references inlined, `nullable` instead of null
unions, no titles or defaults, OpenAPI 3.0 exclusive bounds), so `kubectl
apply` rejects what the pipeline would reject wherever a schema can say it.
What a schema cannot say (cross-field rules) the operator reports as
`Failed/InvalidSpec` with the pipeline's message.

    python scripts/gen_crd.py     # rewrites helm/krunch/crds/compressionjobs.krunch.dev.yaml
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from krunch.spec import API_VERSION, KIND, JobSpec

GROUP, VERSION = API_VERSION.split("/")
PLURAL, SINGULAR, SHORT = "compressionjobs", "compressionjob", "cj"
CRD_PATH = Path(__file__).resolve().parent.parent / "helm" / "krunch" / "crds" / f"{PLURAL}.{GROUP}.yaml"
# Rules a model validator enforces that a schema can also say.
# exactly one of: fixed, energy, maxError (RankRule); paramRatio, bytesRatio (Target)
EXTRA_CONSTRAINTS = {"RankRule": {"minProperties": 1, "maxProperties": 1}, "Target": {"minProperties": 1, "maxProperties": 1}}
PHASES = ["Pending", "Queued", "Running", "Succeeded", "Failed", "Cancelled"]
DROPPED_KEYWORDS = ("title", "default", "additionalProperties", "$defs")

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "enum": PHASES},
        "reason": {"type": "string", "description": "short machine-readable cause, e.g. InvalidSpec, SubmissionFailed, JobFailed, DeadlineExceeded"},
        "message": {"type": "string"},
        "progress": {"type": "string", "description": "e.g. 12/30 layers"},
        "startTime": {"type": "string", "format": "date-time"},
        "endTime": {"type": "string", "format": "date-time"},
        "rayJobId": {"type": "string", "description": "Ray submission id (executor rayJob: also the RayJob's jobId)"},
        "attempt": {"type": "integer", "minimum": 0, "description": "0-based attempt of the Ray job, up to spec.backoffLimit"},
        "executor": {"type": "string", "enum": ["rayCluster", "rayJob"], "description": "where the job was submitted"},
        "mlflowRunId": {"type": "string"},
        "modelVersion": {"type": "string"},
        "modelUri": {"type": "string", "description": "models:/NAME/VERSION, what mlflow.pytorch.load_model takes"},
        "compressionRatio": {"type": "number"},
        "qualityMetric": {"type": "string"},
        "qualityBefore": {"type": "number"},
        "qualityAfter": {"type": "number"},
        "conditions": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    },
}  # fmt: skip

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Ratio", "type": "number", "jsonPath": ".status.compressionRatio"},
    {"name": "Model-Version", "type": "string", "jsonPath": ".status.modelVersion"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """pydantic JSON schema -> Kubernetes structural OpenAPI v3 schema."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        resolved = structural(defs[name], defs) | EXTRA_CONSTRAINTS.get(name, {})
        return resolved | {k: structural(v, defs) for k, v in node.items() if k not in ("$ref", *DROPPED_KEYWORDS)}
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        rest = {k: v for k, v in node.items() if k not in ("anyOf", *DROPPED_KEYWORDS)}
        if len(options) == 1:
            merged = structural(options[0], defs) | structural(rest, defs)
            return merged | ({"nullable": True} if nullable else {})
        # a true union (a config or a boolean): the schema keeps it, the pipeline checks it
        return structural(rest, defs) | {"x-kubernetes-preserve-unknown-fields": True}
    out: dict[str, Any] = {}
    if node.get("type") == "object" and node.get("additionalProperties") is True and "properties" not in node:
        out["x-kubernetes-preserve-unknown-fields"] = True  # a free mapping (a method's options): kept, checked by the pipeline
    for key, value in node.items():
        if key in DROPPED_KEYWORDS:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = value, True  # OpenAPI 3.0 spelling
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: structural(schema, defs) for name, schema in value.items()}
        else:
            out[key] = structural(value, defs)
    return out


def spec_schema() -> dict[str, Any]:
    schema = JobSpec.model_json_schema(by_alias=True)
    return structural(schema, schema.get("$defs", {}))


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition document."""
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": STATUS_SCHEMA,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": [SHORT], "listKind": f"{KIND}List"},
            "versions": [{"name": VERSION, "served": True, "storage": True, "schema": {"openAPIV3Schema": schema},
                          "subresources": {"status": {}}, "additionalPrinterColumns": PRINTER_COLUMNS}],  # fmt: skip
        },
    }


def render() -> str:
    header = "# Generated by scripts/gen_crd.py from krunch.spec; do not edit by hand (a test fails on drift).\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def validation_schema(document: dict[str, Any]) -> dict[str, Any]:
    """The CRD's schema as a JSON Schema validator sees it under strict field validation (`kubectl apply`'s
    default): `nullable` admits null, and objects with listed properties reject unknown ones."""
    schema = copy.deepcopy(document["spec"]["versions"][0]["schema"]["openAPIV3Schema"])

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: convert(value) for key, value in node.items()}
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if node.get(key) is True:
                node[key] = node.pop(bound)
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node

    return convert(schema)

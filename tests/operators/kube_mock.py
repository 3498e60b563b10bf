"""KMock (the Kubernetes API mock by kopf's author), made to behave enough like a real API server.

No API server installs on the CI machine, so the operator's end-to-end tests
run the real `kopf run` process and real `kubectl` against this over HTTP.
Stock kmock 0.8 lacks what a real server does and kopf or kubectl rely on; this
subclass adds it:

- objects get `uid`, `resourceVersion` (bumped on every change), `generation`,
  `creationTimestamp`, their namespace from the URL, and a name from `generateName`;
- a POSTed CustomResourceDefinition registers its resource (kind, short names,
  subresources), so the test applies the chart's CRD file like on a cluster;
- custom resources are pruned by their CRD's structural schema on create and
  patch (fields the schema does not declare are dropped, as a real API server
  does), so an undeclared status field fails the tests here as it would there;
- list responses carry `kind: <Kind>List` and `apiVersion`;
- `/api/v1/namespaces[/NAME]` addresses Namespace objects (stock kmock reads
  "namespaces" there as the start of a namespaced path and fails).

With `--record FILE` it appends one JSON line per resource request (client
user agent, RBAC verb, group, resource/subresource, namespace): the RBAC test
derives the operator's permissions from such a session.

Run as a process (`python -m tests.operators.kube_mock --port N`): it prints
`ready http://127.0.0.1:N` when it serves, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import signal
import sys
import uuid
from typing import Any

import kmock
from kmock._internal import enums, parsing, rendering

CORE = {"v1/namespaces": ("Namespace", False), "v1/events": ("Event", True),
        "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False)}  # fmt: skip
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
# kmock's UPDATE action is RBAC's patch (or update, for PUT): told apart by the HTTP method in _record
RBAC_VERBS = {enums.action.LIST: "list", enums.action.WATCH: "watch", enums.action.FETCH: "get", enums.action.CREATE: "create",
              enums.action.DELETE: "delete"}  # fmt: skip


_parse_path = parsing.parse_path


def parse_path(path: str) -> parsing.ParsedPath:
    """kmock's path parser, plus the cluster-scoped Namespace resource itself."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 5 and (len(parts) < 5 or parts[4] in ("status", "finalize")):
        name = parts[3] if len(parts) > 3 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, parts[4] if len(parts) > 4 else None)
    return _parse_path(path)


parsing.parse_path = parse_path  # kmock's request parsing looks it up on the module


def prune(value: Any, schema: dict[str, Any]) -> None:
    """Drop the object fields `schema` does not declare, in place (a real API server's pruning of custom
    resources). Only where the schema lists `properties`: `metadata` and preserve-unknown parts stay whole."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict) and "properties" in schema:
        declared = schema["properties"]
        for key in list(value):
            if key not in declared:
                del value[key]
            elif isinstance(value[key], dict | list):
                prune(value[key], declared[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            prune(item, schema["items"])


class KubernetesAPI(kmock.KubernetesEmulator):
    """KMock's emulator plus object metadata, CRD registration, typed lists and a request record."""

    record_path: str | None = None  # set before serving: where to append the request record

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self._kinds: dict[tuple[str, str, str], str] = {}
        self._schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
        for name, (kind, namespaced) in CORE.items():
            self.declare(name, kind=kind, namespaced=namespaced)

    def declare(self, name: str, kind: str, namespaced: bool, singular: str | None = None,
                shortnames: tuple[str, ...] = (), subresources: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.resources[name] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, singular=singular or kind.lower(),
                                                  verbs=VERBS, shortnames=set(shortnames), subresources=set(subresources))  # fmt: skip
        resource = kmock.resource(name)
        self._kinds[(resource.group or "", resource.version or "", resource.plural or "")] = kind

    def _record(self, request: rendering.Request) -> None:
        resource = request.resource
        verb = RBAC_VERBS.get(request.action)
        if request.action == enums.action.UPDATE:
            verb = "update" if request.method == enums.method.PUT else "patch"
        if not self.record_path or resource is None or not resource.plural or verb is None:
            return  # discovery and other non-resource URLs: every authenticated client may read them
        plural = f"{resource.plural}/{request.subresource}" if request.subresource else resource.plural
        entry = {"agent": request.headers.get("User-Agent", ""), "verb": verb, "group": resource.group or "",
                 "resource": plural, "namespace": request.namespace}  # fmt: skip
        with open(self.record_path, "a") as record:
            record.write(json.dumps(entry) + "\n")

    async def _handle(self, request: rendering.Request) -> Any:
        self._record(request)
        if request.resource is not None and isinstance(request.data, dict):
            resource = request.resource
            schema = self._schemas.get((resource.group or "", resource.version or "", resource.plural or ""))
            if schema and request.action in (enums.action.CREATE, enums.action.UPDATE):
                prune(request.data, schema)
            if request.action == enums.action.CREATE:
                self._stamp_new(request)
                if request.resource.group == "apiextensions.k8s.io":
                    self._register_crd(request.data)
            elif request.action == enums.action.UPDATE:
                request.data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        return await super()._handle(request)

    def _stamp_new(self, request: rendering.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        meta["creationTimestamp"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema:
                self._schemas[(spec["group"], version["name"], names["plural"])] = schema
            self.declare(
                f"{spec['group']}/{version['name']}/{names['plural']}", kind=names["kind"],
                namespaced=spec.get("scope") == "Namespaced", singular=names.get("singular"),
                shortnames=tuple(names.get("shortNames", [])), subresources=tuple(version.get("subresources", {})),
            )  # fmt: skip

    async def _serve_version(self, request: rendering.Request) -> Any:
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")  # the core group is "v1", not "/v1"
        for entry in payload["resources"]:
            if "/" in entry["name"]:  # subresources have no short names of their own
                entry["shortNames"] = []
        return payload

    async def _serve_list(self, request: rendering.Request) -> Any:
        payload = await super()._serve_list(request)
        resource = request.resource
        kind = self._kinds.get((resource.group or "", resource.version or "", resource.plural or ""))
        group_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
        return {"apiVersion": group_version, "kind": f"{kind or 'Unknown'}List", **payload}


async def serve(port: int, record: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = KubernetesAPI()
    api.record_path = record
    async with api, kmock.Server(api, host="127.0.0.1", port=port) as server:
        print(f"ready {server.url}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", help="append a JSON line per resource request to this file")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.record))


if __name__ == "__main__":
    sys.exit(main())

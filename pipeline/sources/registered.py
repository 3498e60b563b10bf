"""`models:/NAME/VERSION` and `models:/NAME@ALIAS` as a source: a registered krunch version, reloaded
from the safetensors + manifest it carries, never by unpickling its MLflow pickle."""

from __future__ import annotations

import tempfile
from pathlib import Path

from krunch.artifact import MANIFEST, load_compressed
from krunch.errors import ModelSourceError
from krunch.model import LoadedModel

KRUNCH_FILES = "extra_files"  # where mlflow.pytorch.log_model puts the extra files inside the model


def load_registered(reference: str, factory: str | None = None) -> LoadedModel:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from krunch.registry.tracking import callers_mlflow_kept, configure, parse_models_uri, registry_version, version_files_uri

    name, version, alias = parse_models_uri(reference)  # the shape first: a clear error without touching the server
    with callers_mlflow_kept(), tempfile.TemporaryDirectory(prefix="krunch-registered-") as scratch:
        configure()
        try:
            version = registry_version(name, version, alias)
            pinned = f"models:/{name}/{version}"  # what a model built on it records: aliases move
            # only krunch's files: the consumers' pickle beside them is as large as the weights and never read here
            files = Path(download_artifacts(artifact_uri=f"{version_files_uri(name, version)}/{KRUNCH_FILES}", dst_path=scratch))
        except MlflowException as err:
            raise ModelSourceError(reference, " ".join(str(err.message).split())[:300]) from None
        if not (files / MANIFEST).is_file():
            raise ModelSourceError(reference, f"this registered version carries no krunch {MANIFEST}; krunch loads registered "
                                   "models only from their safetensors and manifest, never by unpickling")  # fmt: skip
        loaded = load_compressed(files, reference, factory=factory)
    loaded.metadata["registry_version"] = version
    loaded.metadata["pinned_reference"] = pinned
    return loaded

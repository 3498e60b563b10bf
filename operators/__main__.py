"""`python -m krunch.operator`: the operator as the Helm chart runs it, every setting from the environment.

Equivalent to `kopf run --standalone -m krunch.operator.handlers` with the namespaces
and the liveness endpoint taken from KRUNCH_NAMESPACES and KRUNCH_HEALTH_PORT,
so one set of environment variables configures everything. Standalone: the
concurrency limit lives in this one process, so run a single replica.
"""

from __future__ import annotations

import kopf

from krunch.operator import handlers


def main() -> None:
    settings = handlers.SETTINGS
    kopf.configure(debug=settings.log_level == "DEBUG", verbose=settings.log_level == "DEBUG")
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=f"http://{settings.health_host}:{settings.health_port}/healthz",
    )


if __name__ == "__main__":
    main()

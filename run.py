"""Hydra entry point: python run.py [group=option ...] [key=value ...] [-m]."""

import hydra

import basis_sharing.config  # noqa: F401  (registers the config schemas and resolvers)
import basis_sharing.finetune  # noqa: F401  (registers every fine-tuner and its schema)
import basis_sharing.methods  # noqa: F401  (registers every method and its config schema)
import basis_sharing.runtime  # noqa: F401  (registers the runtime options' schemas)
from basis_sharing import pipeline
from basis_sharing.methods.caches import SweepCaches
from basis_sharing.runtime import distributed


def main() -> None:
    # The owner of the sweep's caches: this process. Hydra's basic launcher runs every job of a
    # -m sweep in it, one call of `job` each, so they all see this one object.
    caches = SweepCaches()

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def job(cfg) -> None:
        pipeline.main(cfg, caches)

    try:
        job()
    finally:  # under torchrun: leave the process group every job of this process shared
        distributed.shutdown()


if __name__ == "__main__":
    main()

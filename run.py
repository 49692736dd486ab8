"""Hydra entry point: python run.py [group=option ...] [key=value ...] [-m]."""

import hydra

import basis_sharing.config  # noqa: F401  (registers the config schemas)
from basis_sharing import pipeline


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> None:
    pipeline.main(cfg)


if __name__ == "__main__":
    main()

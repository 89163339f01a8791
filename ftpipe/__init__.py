"""ftpipe: fine-tune LLMs from declarative Hydra YAML through a cached stage pipeline."""

__version__ = "0.1.0"

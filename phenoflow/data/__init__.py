"""Data: shard format, loaders (webdataset / DALI), converters, synthetic cell painting. See docs/data.md."""
from .loader import ShardLoader
from .prepare import prepare_data
from .shards import load_manifest, manifest_vocabs, write_shards
from .synthetic import SyntheticSpec, describe_effects, generate_synthetic
from .vocab import CONTROL, Vocab

__all__ = ["CONTROL", "ShardLoader", "SyntheticSpec", "Vocab", "describe_effects", "generate_synthetic",
           "load_manifest", "manifest_vocabs", "prepare_data", "write_shards"]

"""deploy: a checkpoint turned into tier stage shards (+ ONNX for the device tier) and a manifest.

The relay imports from here: `load_tier(dir, tier) -> TierStage`, `StageOut`, `ShardError`.
"""
from deploy.manifest import ShardError, TierSpecError
from deploy.shards import StageOut, TierStage, load_chain, load_tier, split_checkpoint, verify_dir

__all__ = ["ShardError", "TierSpecError", "StageOut", "TierStage", "load_chain", "load_tier",
           "split_checkpoint", "verify_dir"]

"""deploy: a checkpoint turned into tier stage shards (+ ONNX for the device tier) and a manifest.

`deploy.shards`: `split_checkpoint`, `load_tier(dir, tier) -> TierStage` (a trunk Stage), `verify_dir`;
`deploy.manifest`: the manifest format, tier specs, `ShardError`; `deploy.onnx_export`: the ONNX device tier.
"""

"""The pack's own ComfyUI types, in one place."""

from comfy_api.latest import io

StyleReference = io.Custom("STYLE_REFERENCE")  # glue.references.ExternalReference
Inversion = io.Custom("INVERSION")  # inversion.ddim.InversionTrajectory
AttentionMaps = io.Custom("ATTENTION_MAPS")  # attention_patches.attention_maps.AttentionMapRecorder
ContentFeatures = io.Custom("CONTENT_FEATURES")  # glue.source_features.RecordedSource
FastSAM = io.Custom("FASTSAM")  # mask.fastsam.FastSAMModel
StyleInversion = io.Custom("STYLE_INVERSION")  # inversion.style_inversion.StyleInversion

"""The model graph: backbones, where exits are grafted and their heads (graft, heads), MAC counts (flops),
the personal multi-exit model, the cascade's stages, whole passes of photos (inference), and the vetting
of model files before Keras reads them (trust). Imports base only."""

"""IKD-MIL (He et al. 2024): MIL pseudo-masks from an FCN with deep-supervised side outputs, and distillation."""

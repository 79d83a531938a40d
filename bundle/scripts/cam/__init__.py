"""Stage 1: the multi-label CAM classifier, its class activation maps and validation metrics."""

"""Stage 3: the segmentation network, its loss on pseudo-masks, data views, metrics and class maps."""

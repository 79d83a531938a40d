"""Stage 2: CAM prompts into Segment Anything, the pseudo-mask rules and outputs, decoder refinement."""

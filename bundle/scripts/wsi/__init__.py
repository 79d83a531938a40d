"""Stage 4: whole-slide reading, tiled inference and the outputs QuPath and ASAP open."""

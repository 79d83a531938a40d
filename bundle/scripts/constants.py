"""Values every stage agrees on, defined once."""

import numpy as np

# A label map's value for "no class": ignored in pseudo-masks, ground truth and losses; "no tissue" in slide outputs.
IGNORE = 255
NO_TISSUE = IGNORE

# distinct colours (Trubetskoy's list) for prediction and ground-truth overlays; class c gets PALETTE[c % 10]
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
    ],
    np.uint8,
)

"""Datalists and the dataset adapters that write them (GlaS, LUAD-HistoSeg, BCSS-WSSS, CSV, slides, the demo)."""

"""Python components of the pathology_wsss bundle: only what MONAI and ignite do not provide."""

"""Python components of the pathology_wsss bundle: only what MONAI and ignite do not provide."""

import os

# cuCIM loads NVIDIA cuFile, which writes ./cufile.log and prints CUDA-missing warnings on CPU machines.
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
os.environ.setdefault("CUFILE_LOGGING_LEVEL", "ERROR")

"""Python components of the pathology_wsss bundle: only what MONAI and ignite do not provide."""

import os

from .errors import install

# cuCIM loads NVIDIA cuFile, which writes ./cufile.log and prints CUDA-missing warnings on CPU machines.
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
os.environ.setdefault("CUFILE_LOGGING_LEVEL", "ERROR")
install()  # a bad input ends `monai.bundle run` with one line naming it, not a traceback

"""The dataset adapters' command line, run from the project root:
``PYTHONPATH=bundle python -m scripts.data glas --data_dir ../shared/data/glas --output data/glas/datalist.json``.
"""

import logging
import sys
from collections.abc import Sequence

import fire

from ..errors import DataError
from .adapters import bcss_wsss, from_csv, from_mask_folder, glas, luad_histoseg
from .demo import prepare_demo
from .slides import from_slides


def _logging() -> None:
    """Progress (INFO) to stdout, warnings and errors to stderr: stderr stays empty on success."""
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[out, err])


def main(argv: Sequence[str] | None = None) -> None:
    """Fire command line; bad input ends with one line ``error: FILE: problem`` on stderr (exit code 1)."""
    _logging()
    commands = {
        "glas": glas,
        "luad_histoseg": luad_histoseg,
        "bcss_wsss": bcss_wsss,
        "from_csv": from_csv,
        "from_mask_folder": from_mask_folder,
        "from_slides": from_slides,
        "demo": prepare_demo,
    }
    try:
        fire.Fire(commands, command=argv)
    except (DataError, OSError) as e:  # OSError: an unwritable output folder or a full disk, with its path
        sys.exit("error: " + " ".join(str(e).split()))


if __name__ == "__main__":
    main()

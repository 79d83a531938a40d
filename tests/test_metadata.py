"""The bundle's metadata follows MONAI's schema and names the network's outputs."""

import json
import subprocess
import sys

from conftest import BUNDLE, ROOT, shared


def test_metadata_verifies_offline_against_the_schema():
    schema = shared("..", "schemas", "meta_schema_20240725.json").resolve()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(BUNDLE / "configs" / "metadata.json"),
            "--filepath",
            str(schema),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_describes_rgb_input_and_named_class_outputs():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["name"] == "pathology_wsss" and meta["changelog"]
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 3
    out = fmt["outputs"]["pred"]
    assert len(out["channel_def"]) == out["num_channels"] and all(
        isinstance(v, str) for v in out["channel_def"].values()
    )


def test_output_channels_are_the_default_training_data_classes():
    from scripts.data.render import CLASSES

    out = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]
    assert [out["channel_def"][str(i)] for i in range(out["num_channels"])] == list(CLASSES)

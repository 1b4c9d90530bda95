"""README.md is a newcomer's first page: the screenshots it shows are in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_image_the_readme_shows_is_in_the_repository():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    assert images, "the README shows no screenshot"
    for image in images:
        assert (ROOT / image).is_file(), f"README shows {image}, which is missing"

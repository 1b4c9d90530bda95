"""What Tuneboard tells a user to type follows the Hugging Face ecosystem as it is today."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_message_or_page_suggests_the_removed_huggingface_cli():
    """huggingface_hub 1.0 (which transformers 5 requires) replaced `huggingface-cli` with `hf`."""
    files = [ROOT / "README.md", ROOT / "Dockerfile", ROOT / "docker-compose.yml"]
    for folder, pattern in (("app", "*.py"), ("worker", "*.py"), ("templates", "*.html")):
        files += (ROOT / folder).rglob(pattern)
    offenders = [str(f.relative_to(ROOT)) for f in files if "huggingface-cli" in f.read_text()]
    assert offenders == []

"""API key files: one key per line (no web framework needed to read them, so the CLI's
flag parsing does not import the server's)."""

from __future__ import annotations

from pathlib import Path


def read_key_file(path: str) -> list[str]:
    """API keys, one per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise ValueError(f"the API key file {path} holds no key")
    return keys

"""Debian's chromium driven by Playwright, for the tests of the two pages (no Playwright browser download)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def sync_playwright() -> Any:
    """Playwright's ``sync_playwright``, or a skip that says what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download is needed)")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return sync_playwright


def launch(playwright: Any, *args: str, microphone: Path | None = None) -> Any:
    """Headless chromium with ``args``; with ``microphone``, a fake capture device playing that WAV file, its
    permission granted."""
    fake_microphone = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                       f"--use-file-for-fake-audio-capture={microphone}"] if microphone is not None else []
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*fake_microphone, *args])

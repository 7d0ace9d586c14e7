"""Shared fixtures: the demo model (loaded once per session) and the shared text data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The folder of WikiText-2 files that tests and benchmarks read."""
    configured = os.environ.get("LIEQ_SHARED_DATA")
    return Path(configured) if configured else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def test_text_path() -> Path:
    path = shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"WikiText-2 test split not found at {path}; set LIEQ_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def calib_text_path() -> Path:
    path = shared_data_dir() / "wikitext-2-valid" / "valid.txt"
    if not path.is_file():
        pytest.skip(f"WikiText-2 validation split not found at {path}; set LIEQ_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def demo_model():
    """The imported demo model in float32, shared by every test that only reads it."""
    from lieq_mlx.models import load_model

    return load_model("demo")


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from lieq_mlx.models import resolve_model

    return resolve_model("demo")


def pytest_report_header(config):
    from lieq_mlx.platform import blas_in_use

    blas = blas_in_use()
    hint = "" if blas != "reference" else " (slow: run through `make test` to preload OpenBLAS)"
    return f"lieq-mlx: BLAS {blas}{hint}"

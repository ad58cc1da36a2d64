"""Fixtures shared by the pipeline tests: the oracle model dir (tests/oracle_model.py) and its OpenVINO
model, built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

import infer
import oracle_model


@pytest.fixture(scope="session")
def oracle_dir(tmp_path_factory) -> Path:
    """encoder/decoder IR and ONNX of the oracle: outputs exactly computable in numpy."""
    return oracle_model.build(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="session")
def model(oracle_dir) -> infer.Model:
    return infer.OpenVINOModel(oracle_dir, precision="f32", cache_dir=None)

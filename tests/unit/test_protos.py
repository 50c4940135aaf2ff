"""The committed generated code must match what the .proto files generate now."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lines that carry the generator's own version, which a compatible grpcio-tools may change
# without changing the generated API.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|\s*\d+,\s*$)", re.MULTILINE
)


def _normalise(text: str) -> str:
    return _VERSION_LINES.sub("", text)


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    protos = sorted((ROOT / "protos" / "devpass" / "v1").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *map(str, protos),
        ],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "devpass" / "v1").iterdir())
    committed = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "devpass" / "v1").iterdir()
        if p.name != "__init__.py" and p.is_file()
    )

    assert generated == committed, "run `make protos` and commit the result"
    for relative in generated:
        fresh = _normalise((tmp_path / relative).read_text())
        current = _normalise((ROOT / relative).read_text())
        assert fresh == current, f"{relative} is stale: run `make protos` and commit the result"

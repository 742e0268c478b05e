"""Schemathesis against the server's own OpenAPI schema, with API keys on and off: no generated request may get a
5xx (#12). Not part of CI (minutes of generated requests); run it after changing the server:

    pip install schemathesis
    python scripts/fuzz_api.py [--examples 40]

A real server on loopback serves the bundled model with a short context (generated requests then finish fast).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import gemmakit  # noqa: E402
from gemmakit.server import create_app  # noqa: E402
from gemmakit.server.limits import ServerLimits  # noqa: E402
from serving import Server  # noqa: E402

KEY = "fuzz-key"


def fuzz(llm, keys: list[str], examples: int) -> int:
    """Run schemathesis against one server; returns its exit status (0: every check passed)."""
    app = create_app(llm, api_keys=keys, context_length=256, max_batch=4, limits=ServerLimits(max_n=2))
    headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
    with Server(app) as server, tempfile.TemporaryDirectory() as tmp:
        schema = Path(tmp) / "openapi.json"
        schema.write_text(json.dumps(httpx.get(server.url + "/openapi.json", headers=headers).json()))
        command = [sys.executable, "-m", "schemathesis.cli", "run", str(schema), "--url", server.url,
                   "--checks", "not_a_server_error", "--max-examples", str(examples), "--request-timeout", "60"]
        for name, value in headers.items():
            command += ["-H", f"{name}: {value}"]
        print(f"== keys {'on' if keys else 'off'}: {' '.join(command[3:])}", flush=True)
        return subprocess.run(command).returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=40, help="generated requests per operation and phase")
    args = parser.parse_args()
    llm = gemmakit.load()
    results = {"off": fuzz(llm, [], args.examples), "on": fuzz(llm, [KEY], args.examples)}
    print("schemathesis exit status by auth:", results)
    sys.exit(max(results.values()))


if __name__ == "__main__":
    main()

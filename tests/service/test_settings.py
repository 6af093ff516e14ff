"""Settings that refuse unsafe values at start-up: API keys that are short, placeholders or plainly not random
are refused with a message that says how to make one, and never repeat the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.redis_server import free_port
from service.settings import MAKE_A_KEY, Settings, describe_validation_error

ROOT = Path(__file__).resolve().parents[2]
K8S_PLACEHOLDER = "REPLACE-ME-with-a-random-key"  # what k8s/secret.yaml shipped once: still refused if it is deployed


@pytest.mark.parametrize(("key", "why"), [
    ("s3cret", "6 characters long; at least 16"),
    ("fifteen-chars-x", "15 characters long; at least 16"),
    (K8S_PLACEHOLDER, "placeholder"),
    ("changeme-changeme-2024", "placeholder"),
    ("aaaaaaaaaaaaaaaaaaaaaaaa", "fewer than 8 different characters"),
    ("a-good-key-but with-a-space", "spaces or control characters"),
])
def test_weak_api_keys_are_refused_with_how_to_make_one(key: str, why: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_keys=["a-real-key-0123456789", key])
    message = describe_validation_error(caught.value)
    assert message.startswith("api_keys: ") and "API key #2 of DDPM_API_KEYS" in message and why in message
    assert MAKE_A_KEY in message and key not in message


def test_generated_keys_are_accepted() -> None:
    import secrets

    keys = [secrets.token_urlsafe(32) for _ in range(3)] + [secrets.token_hex(8)]
    assert Settings(api_keys=keys).api_keys == keys


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_the_processes_refuse_a_short_key_at_start_up_without_echoing_it(command: str) -> None:
    env = {**os.environ, "DDPM_API_KEYS": "hunter2-short"}
    port = ["--port", str(free_port())] if command == "serve" else ["--metrics-port", "0"]
    proc = subprocess.run([sys.executable, "-m", "service.cli", command, *port], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "at least 16" in proc.stderr and MAKE_A_KEY in proc.stderr and "Traceback" not in proc.stderr
    assert "hunter2-short" not in proc.stderr + proc.stdout

"""Settings that refuse unsafe values at start-up: API keys that are short, placeholders or plainly not random
are refused with a message that says how to make one, and never repeat the key; checkpoints that are not
``NAME=FILE``; and command-line flags on top of the environment (``settings_from_args``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.redis_server import free_port
from service.settings import MAKE_A_KEY, Settings, describe_validation_error, parse_checkpoints, settings_from_args

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


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_checkpoints_parse_in_order_the_first_is_the_default() -> None:
    parsed = parse_checkpoints(" cifar10=/m/c.safetensors , ,digits.v2=d.safetensors,")
    assert list(parsed.items()) == [("cifar10", "/m/c.safetensors"), ("digits.v2", "d.safetensors")]
    assert parse_checkpoints(["a_b-1=x=y"]) == {"a_b-1": "x=y"}  # the first '=' splits: paths may hold one
    assert parse_checkpoints({"z": "1", "a": "2"}) == {"z": "1", "a": "2"}
    assert Settings(checkpoints="b=2,a=1").default_model == "b"


@pytest.mark.parametrize(("value", "why"), [
    ("cifar10", "'cifar10' must look like NAME=FILE"),
    ("=file.safetensors", "must look like NAME=FILE"),
    ("name=", "'name=' must look like NAME=FILE"),
    ("  =  ", "must look like NAME=FILE"),
    ("my model=f", "name 'my model' may hold only letters, digits, '-', '_' and '.'"),
    ("../x=f", "name '../x' may hold only"),
    ("a=1,a=2", "name 'a' given twice"),
])
def test_checkpoints_that_are_not_name_file_are_refused(value: str, why: str) -> None:
    with pytest.raises(ValueError, match="checkpoint") as caught:
        parse_checkpoints(value)
    assert why in str(caught.value)
    with pytest.raises(ValidationError) as refused:  # the same words when the setting is read
        Settings(checkpoints=value)
    assert why in describe_validation_error(refused.value)


def test_at_least_one_checkpoint_is_needed() -> None:
    for empty in ("", " , ", []):
        with pytest.raises(ValidationError, match="at least one checkpoint NAME=FILE is needed"):
            Settings(checkpoints=empty)


# ---- flags on top of the environment ------------------------------------------------------------------------
FLAGS = {"port": "port", "checkpoint": "checkpoints", "metrics_port": "worker_metrics_port"}


def test_flags_that_were_given_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPM_PORT", "9000")
    monkeypatch.setenv("DDPM_WORKER_METRICS_PORT", "9300")
    monkeypatch.setenv("DDPM_REDIS_URL", "redis://env:6379/1")
    args = argparse.Namespace(port=8100, checkpoint=["a=1.safetensors", "b=2.safetensors"], metrics_port=None)
    settings = settings_from_args(args, FLAGS)
    assert settings.port == 8100 and settings.checkpoints == {"a": "1.safetensors", "b": "2.safetensors"}
    assert settings.worker_metrics_port == 9300  # not given: the environment's
    assert settings.redis_url == "redis://env:6379/1"  # not a flag of this command
    assert settings_from_args(argparse.Namespace(), FLAGS).port == 9000  # a flag the parser did not define


def test_a_flag_value_is_validated_like_the_variable() -> None:
    with pytest.raises(ValidationError) as caught:
        settings_from_args(argparse.Namespace(port=70000), FLAGS)
    assert describe_validation_error(caught.value).startswith("port: ")


def test_a_table_that_names_no_setting_is_a_mistake_in_the_command() -> None:
    with pytest.raises(ValueError, match=r"flags name \['prot'\], which are not settings"):
        settings_from_args(argparse.Namespace(port=1), {"port": "prot"})

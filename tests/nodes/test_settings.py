"""Start-up refuses malformed settings with a message that names the variable."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.procs import PYTHON, REPO_ROOT


def run_check(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ROUTERPANEL_") and k != "DATABASE_URL"}
    return subprocess.run(
        [PYTHON, "manage.py", "check"], cwd=REPO_ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ROUTERPANEL_DEBUG": "maybe"}, "ROUTERPANEL_DEBUG='maybe' is not a boolean"),
        ({"ROUTERPANEL_DEBUG": "0"}, "ROUTERPANEL_SECRET_KEY is required"),
        ({"ROUTERPANEL_MAX_BODY_BYTES": "lots"}, "ROUTERPANEL_MAX_BODY_BYTES='lots' is not an integer"),
        ({"ROUTERPANEL_REDIS_URL": "localhost:6379"}, "ROUTERPANEL_REDIS_URL must be a redis://"),
        ({"ROUTERPANEL_DEFAULT_ENGINE_TYPE": "tgi"}, "ROUTERPANEL_DEFAULT_ENGINE_TYPE='tgi' must be one of"),
        ({"DATABASE_URL": "nosuchdb://x"}, "DATABASE_URL is malformed"),
    ],
)
def test_malformed_settings_stop_start_up_with_a_clear_message(env: dict[str, str], message: str) -> None:
    result = run_check(**env)
    assert result.returncode != 0
    assert message in result.stderr


def test_defaults_start_cleanly() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr


def test_production_settings_pass_the_deploy_checks() -> None:
    secret = "k" * 20 + "abcdefghijklmnopqrstuvwxyz0123456789-_"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ROUTERPANEL_") and k != "DATABASE_URL"}
    env = {
        **clean,
        "ROUTERPANEL_DEBUG": "0",
        "ROUTERPANEL_SECRET_KEY": secret,
        "ROUTERPANEL_ALLOWED_HOSTS": "router.example.com",
    }
    result = subprocess.run(
        [PYTHON, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout

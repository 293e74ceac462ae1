"""The entry points as users run them (subprocesses)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})


def test_info_prints_exact_parameter_count_and_calls():
    r = run_cli(os.path.join(ROOT, "eval.py"), "info", "cifar10")
    assert r.returncode == 0, r.stderr
    assert "parameters: 35,746,307" in r.stdout
    assert "100 quadratic steps" in r.stdout and "network calls: 96" in r.stdout


def test_info_unknown_dataset_is_one_clear_line():
    r = run_cli(os.path.join(ROOT, "eval.py"), "info", "imagenet")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "invalid choice: 'imagenet'" in r.stderr and "cifar10" in r.stderr and "lsun_church" in r.stderr

"""eval.py info, in this process (run_main): the process itself is not what these test; the real
process's exit code and stderr are checked once per CLI in tests/test_bad_input.py."""
from tests.helpers import run_main


def test_info_prints_exact_parameter_count_and_calls(capsys):
    code, out, err = run_main("eval", ["info", "cifar10"], capsys)
    assert code == 0, err
    assert "parameters: 35,746,307" in out
    assert "100 quadratic steps" in out and "network calls: 96" in out


def test_info_unknown_dataset_is_one_clear_line(capsys):
    code, _, err = run_main("eval", ["info", "imagenet"], capsys)
    assert code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "invalid choice: 'imagenet'" in err and "cifar10" in err and "lsun_church" in err

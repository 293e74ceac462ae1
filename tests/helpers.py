"""Shared test helpers: running the CLIs, and a tiny teacher with random (non-zero) weights."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=900, env=None, **popen):
    """Run `python <args>` in the repository root, as a user would (`env`: extra variables)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {}), "PYTHONPATH": ROOT},
                          **popen)


def make_tiny_teacher(folder: str, seed: int = 0) -> str:
    """A converted checkpoint of the tiny network with random weights from the independent
    reference (the official init zeroes conv_out, which would make the teacher trivial)."""
    from models.configs import CONFIGS
    from models.unet import UNet, official_variables
    from models.weights import save_converted
    from tests.reference.official import official_variable_shapes, random_params

    net = CONFIGS["tiny"].network
    params = random_params(official_variable_shapes(net.ch, net.ch_mult, net.num_res_blocks,
                                                    net.attn_resolutions, net.resolution), seed)
    model = UNet(net)
    for name, var in official_variables(model).items():
        var.assign(params[name])
    return save_converted(model, folder, {"dataset": "tiny", "source": "random (tests)"})


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI's main() in this process through utils.cli.run, as `python module.py argv` would
    (exit code, stdout, stderr); saves the interpreter start-up of a subprocess."""
    import importlib

    import pytest

    from utils.cli import run
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def reader_batches(pairs, global_batch: int, seed: int, epoch: int = 0, part=(0, 1),
                   per_replica: int | None = None, start: int = 0, n: int | None = None):
    """The training reader's per-replica (x, y) batches as NumPy: `n` of them (default: the rest
    of the epoch) from step `start` of `epoch` on, for host part = (host, n_hosts)."""
    from data.reader import PairReader, steps_per_epoch
    per_host = global_batch // part[1]
    per_replica = per_replica or per_host
    if n is None:
        n = (steps_per_epoch(pairs, global_batch) - start) * (per_host // per_replica)
    ds = PairReader(pairs, global_batch, seed).dataset(epoch, start, part, per_replica)
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]

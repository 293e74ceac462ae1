"""Every per-dataset number, in one place: network, teacher sampler, pair set and student training.

Entry points read these and let flags override them; nothing else hard-codes a dataset setting.
Values are those of the paper and its original code (see REFERENCE.md in the design notes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

CKPT_EVERY = 2000  # default steps between checkpoints: the student's, and the teacher's at most


@dataclass(frozen=True)
class NetworkConfig:
    """The DDPM/DDIM U-Net. Official models use GroupNorm epsilon 1e-6."""
    resolution: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1  # teacher training only; the student and all sampling use none
    in_ch: int = 3
    out_ch: int = 3
    gn_eps: float = 1e-6
    gn_groups: int = 32


@dataclass(frozen=True)
class SamplerConfig:
    """The teacher's deterministic DDIM sampler."""
    steps: int
    skip_type: str  # "quadratic" or "uniform"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    eta: float = 0.0


@dataclass(frozen=True)
class PairConfig:
    """The stored (X_T, F_teacher(X_T)) pair set."""
    n_examples: int
    shard_size: int
    n_test: int
    n_examples_fewer: int | None = None  # --use_fewer_lsun_examples
    gen_batch_size: int | None = None  # teacher batch for generation (default: 2x training batch)


@dataclass(frozen=True)
class TrainConfig:
    """Student distillation hyperparameters (original values)."""
    batch_size: int
    loss: str  # "l1" or "l2"
    lr: float
    warmup_steps: int
    beta_1: float
    beta_2: float
    epsilon: float
    ema_decay: float
    epochs: int
    lr_decay: str = "constant"  # after the warmup: "constant" (the paper's) or "cosine" to zero
    student_t: int = 999


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Training a DDPM teacher (epsilon prediction) for datasets without a pretrained one."""
    batch_size: int
    lr: float
    warmup_steps: int
    steps: int
    ema_decay: float
    lr_decay: str = "constant"  # "constant" after the warmup, or "cosine" to zero at the last step
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    network: NetworkConfig
    sampler: SamplerConfig
    pairs: PairConfig
    train: TrainConfig
    teacher: str  # where the pretrained teacher comes from (shown by `eval.py info`)
    teacher_file: str  # default file name of the official checkpoint
    family: str = "ddpm"  # "ddpm" (official TF1 names) or "ddim" (PyTorch state_dict order)
    teacher_train: TeacherTrainConfig | None = None  # set where we train the teacher ourselves
    description: str = ""
    figure_zoom: int = 1  # eval.py figures/interpolate: pixel repeat of the saved grid (--zoom)
    extra: dict = field(default_factory=dict)

    def replace(self, **sections) -> "DatasetConfig":
        """Return a copy with some sections (or fields of a section, as dicts) replaced."""
        changes = {}
        for key, value in sections.items():
            current = getattr(self, key)
            changes[key] = (dataclasses.replace(current, **value)
                            if isinstance(value, dict) and dataclasses.is_dataclass(current) else value)
        return dataclasses.replace(self, **changes)


_QUADRATIC_100 = SamplerConfig(steps=100, skip_type="quadratic")
_UNIFORM_50 = SamplerConfig(steps=50, skip_type="uniform")
_LSUN_NET = NetworkConfig(resolution=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
_LSUN_PAIRS = PairConfig(n_examples=1_024_000, shard_size=2_560, n_test=2_560,
                         n_examples_fewer=204_800)


def _lsun_train(epochs: int) -> TrainConfig:
    return TrainConfig(batch_size=32, loss="l2", lr=5e-6, warmup_steps=1000, beta_1=0.98,
                       beta_2=0.999, epsilon=1e-8, ema_decay=0.9995, epochs=epochs)


CONFIGS: dict[str, DatasetConfig] = {
    "cifar10": DatasetConfig(
        name="cifar10",
        network=NetworkConfig(resolution=32, ch_mult=(1, 2, 2, 2), dropout=0.1),
        sampler=_QUADRATIC_100,
        pairs=PairConfig(n_examples=1_024_000, shard_size=102_400, n_test=51_200),
        train=TrainConfig(batch_size=512, loss="l1", lr=2e-4, warmup_steps=5000, beta_1=0.9,
                          beta_2=0.98, epsilon=1e-8, ema_decay=0.995, epochs=25),
        teacher="DDPM (Ho et al. 2020), TF checkpoint, EMA weights",
        teacher_file="diffusion_cifar10_model/model.ckpt-790000",
    ),
    "celeba": DatasetConfig(
        name="celeba",
        network=NetworkConfig(resolution=64, ch_mult=(1, 2, 2, 2, 4), dropout=0.1),
        sampler=_QUADRATIC_100,
        pairs=PairConfig(n_examples=1_024_000, shard_size=25_600, n_test=10_240),
        train=TrainConfig(batch_size=512, loss="l2", lr=5e-5, warmup_steps=5000, beta_1=0.9,
                          beta_2=0.98, epsilon=1e-8, ema_decay=0.995, epochs=35),
        teacher="DDIM (Song et al. 2020), PyTorch checkpoint, EMA weights",
        teacher_file="celeba/ckpt.pth",
        family="ddim",
    ),
    "lsun_bedroom": DatasetConfig(
        name="lsun_bedroom", network=_LSUN_NET, sampler=_UNIFORM_50, pairs=_LSUN_PAIRS,
        train=_lsun_train(epochs=50),
        teacher="DDPM (Ho et al. 2020), TF checkpoint, EMA weights",
        teacher_file="diffusion_lsun_bedroom_model/model.ckpt-2388000",
    ),
    "lsun_church": DatasetConfig(
        name="lsun_church", network=_LSUN_NET, sampler=_UNIFORM_50, pairs=_LSUN_PAIRS,
        train=_lsun_train(epochs=40),
        teacher="DDPM (Ho et al. 2020), TF checkpoint, EMA weights",
        teacher_file="diffusion_lsun_church_model/model.ckpt-4432000",
    ),
    # The embedded demo: scikit-learn's 1,797 real 8x8 digits at their native resolution (no
    # invented detail, and 4x cheaper than 16x16, which keeps the whole method within an hour on
    # 2 CPU cores). Two levels (8, 4) with attention at 4x4; the teacher is trained here and
    # shipped. Its cosine decay matters: at 12,000 steps, DDIM-49 FD 3.74 vs 5.02 at a constant rate.
    "digits": DatasetConfig(
        name="digits",
        network=NetworkConfig(resolution=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(4,), dropout=0.1, in_ch=1, out_ch=1),
        sampler=SamplerConfig(steps=50, skip_type="quadratic"),
        # An 8x8 network is overhead-bound at small batches: 512 doubles pairs/s on 2 CPU cores.
        # The student overfits few pairs; 20,480 pairs and 6 epochs keep `training.py digits`
        # (pairs, then student) within 10 minutes on 2 cores. The shipped student used more.
        pairs=PairConfig(n_examples=20_480, shard_size=2_048, n_test=1_024, gen_batch_size=512),
        train=TrainConfig(batch_size=64, loss="l1", lr=5e-4, warmup_steps=200, beta_1=0.9,
                          beta_2=0.98, epsilon=1e-8, ema_decay=0.995, epochs=6),
        teacher="DDPM trained here on scikit-learn's digits (shipped in models/pretrained)",
        teacher_file="",
        teacher_train=TeacherTrainConfig(batch_size=64, lr=1e-3, warmup_steps=200, steps=12_000,
                                         lr_decay="cosine",
                                         ema_decay=0.999),
        description="scikit-learn's 8x8 handwritten digits, grayscale; the embedded demo",
        figure_zoom=4,  # 8x8 tiles are too small to see; the grid is saved at 4x, pixels repeated
    ),
    # A tiny configuration for CPU tests: same architecture family, two levels, attention on.
    "tiny": DatasetConfig(
        name="tiny",
        network=NetworkConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(8,), dropout=0.0),
        sampler=SamplerConfig(steps=10, skip_type="quadratic"),
        pairs=PairConfig(n_examples=256, shard_size=64, n_test=64),
        train=TrainConfig(batch_size=32, loss="l1", lr=2e-4, warmup_steps=10, beta_1=0.9,
                          beta_2=0.98, epsilon=1e-8, ema_decay=0.9, epochs=2),
        teacher="random weights (tests only)",
        teacher_file="",
        description="test configuration; not a real dataset",
    ),
}


class UnknownDatasetError(ValueError):
    pass


def get_config(name: str) -> DatasetConfig:
    """The settings of dataset `name`; a clear error listing the valid names otherwise."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; valid datasets: {', '.join(CONFIGS)}") from None

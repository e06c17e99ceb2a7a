"""Train and evaluate the SAEs the paper compares, on synthetic or language-model activations.

Shared by ``sae-lens-gated demo`` and ``sae-lens-gated sweep``. Every SAE trains inside
SAELens's own ``SAETrainer`` (synthetic data) or ``LanguageModelSAETrainingRunner`` (a
language model's activations), with the same optimizer settings for all variants.
"""

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.synthetic import (
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from sae_lens.synthetic.evals import mean_correlation_coefficient
from sae_lens.synthetic.training import SyntheticActivationIterator
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from sae_lens_gated.conversion import check_new_folder
from sae_lens_gated.metrics import relative_reconstruction_bias
from sae_lens_gated.saes.gated_recipes import SPARSE_STEP_OPTIONS, SparseStep
from sae_lens_gated.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.saes.gated_untied_sae import (
    GatedUntiedTrainingSAE,
    GatedUntiedTrainingSAEConfig,
)
from sae_lens_gated.training.multi_runner import multi_config

DEFAULT_SYNTHETIC_MODEL = SyntheticModelConfig(
    num_features=256,
    hidden_dim=64,
    bias=False,
    seed=0,
    mean_firing_magnitudes=1.0,
    std_firing_magnitudes=0.1,
    firing_probability=ZipfianFiringProbabilityConfig(
        exponent=0.5, max_prob=0.2, min_prob=0.005
    ),
)
"""Embedded default: 256 unit, non-orthogonal ground-truth directions in 64 dimensions,
Zipfian firing probabilities between 0.5% and 20% (about 4.3 active per input), magnitudes
around 1."""

# Seed of the held-out synthetic evaluation set.
EVAL_SEED = 12345

# Bins of the histograms of non-zero feature activations (in units of the activations).
MAGNITUDE_BINS = tuple(i * 0.05 for i in range(61))


@dataclass(frozen=True)
class Variant:
    """One SAE design of the comparison.

    Args:
        name: Label used in tables, plots and ``results.json``.
        architecture: ``"gated"``, ``"gated_untied"`` or ``"standard"``.
        overrides: Extra training-config fields (e.g. ``{"recipe": "april_update"}``).
        width_factor: Dictionary size relative to the gated SAE's.
        quick_l1: Sparsity coefficients of the ``--quick`` grid.
        full_l1: Sparsity coefficients of the full grid.
    """

    name: str
    architecture: Literal["gated", "gated_untied", "standard"]
    overrides: dict[str, Any] = field(default_factory=dict)
    width_factor: float = 1.0
    quick_l1: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    full_l1: tuple[float, ...] = (0.15, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)


PAPER = "gated (paper)"
APRIL = "gated (april_update)"
NO_R_MAG = "gated, no r_mag"
UNTIED = "gated, untied encoders"
TRAINABLE_AUX = "gated, trainable aux decoder"
NO_AUX = "gated, no aux loss"
MIXTURE = "gated, discouraged mixture"
BASELINE = "baseline (standard, 1.5x wide)"

VARIANTS: tuple[Variant, ...] = (
    Variant(PAPER, "gated"),
    Variant(APRIL, "gated", {"recipe": "april_update"}),
    Variant(NO_R_MAG, "gated", {"weight_tying": "none"}),
    Variant(UNTIED, "gated_untied"),
    Variant(TRAINABLE_AUX, "gated", {"freeze_decoder_in_aux": False}),
    Variant(
        NO_AUX,
        "gated",
        {"aux_coefficient": 0.0},
        quick_l1=(0.5, 1.0),
        full_l1=(0.25, 0.5, 1.0),
    ),
    # The combination the authors advise against: april_update's L1 weighted by decoder
    # norms (which the sparsity penalty can then shrink) with the paper's frozen decoder in
    # the aux loss, and decoder norms free. The plugin warns about it when it is built.
    Variant(
        MIXTURE, "gated", {"recipe": "april_update", "freeze_decoder_in_aux": True}
    ),
    # SAELens's standard SAE (ReLU, L1 weighted by decoder norms), 1.5x wider: the paper's
    # compute-matched baseline. Its lambda is on a different scale from the gated ones.
    Variant(
        BASELINE,
        "standard",
        width_factor=1.5,
        quick_l1=(0.1, 0.2, 0.35, 0.5, 1.0),
        full_l1=(0.05, 0.1, 0.15, 0.2, 0.35, 0.5, 0.7, 1.0),
    ),
)


@dataclass
class TrainingSettings:
    """Optimizer and schedule settings shared by every run.

    Args:
        steps: Training steps.
        batch_size: Activations per step.
        lr: Adam learning rate (Adam betas are the paper's, (0, 0.999)); warmed up linearly
            over the first 5% of steps.
        l1_warm_up_fraction: Fraction of the steps over which lambda rises from 0.
        device: Torch device.
        sparse_step: The gated SAEs' ``sparse_step`` (``"never"``: dense steps only).
    """

    steps: int = 1500
    batch_size: int = 1024
    lr: float = 3e-3
    l1_warm_up_fraction: float = 0.1
    device: str = "cpu"
    sparse_step: SparseStep = "auto"

    def optimizer_fields(self) -> dict[str, Any]:
        """The Adam and learning-rate fields of SAELens's trainer and runner configs."""
        return {
            "lr": self.lr,
            "lr_warm_up_steps": self.steps // 20,
            "adam_beta1": 0.0,
            "adam_beta2": 0.999,
        }


@dataclass
class RunResult:
    """Metrics of one trained SAE on held-out activations.

    Args:
        variant: The :class:`Variant` name.
        architecture: Its SAELens architecture.
        l1_coefficient: Sparsity coefficient lambda.
        seed: Seed of the SAE initialisation and training stream.
        d_sae: Dictionary size.
        l0: Mean number of active features per input.
        mse: Mean over inputs of ``||x - x_hat||^2``.
        explained_variance: ``1 - E||x - x_hat||^2 / E||x - E x||^2``.
        relative_reconstruction_bias: gamma = E||x_hat||^2 / E[x_hat . x].
        dead_fraction: Fraction of features that never fired on the evaluation set.
        ground_truth_mcc: Mean cosine of Hungarian-matched decoder rows and true features
            (synthetic data only).
        seconds: Training time.
        magnitude_histogram: Counts of non-zero activations in :data:`MAGNITUDE_BINS`.
    """

    variant: str
    architecture: str
    l1_coefficient: float
    seed: int
    d_sae: int
    l0: float
    mse: float
    explained_variance: float
    relative_reconstruction_bias: float
    dead_fraction: float
    ground_truth_mcc: float | None
    seconds: float
    magnitude_histogram: list[int]


def is_healthy(l0: float, explained_variance: float) -> bool:
    """At least one active feature per input and half the variance explained."""
    return l0 >= 1.0 and explained_variance >= 0.5


def build_training_sae(
    variant: Variant,
    d_in: int,
    gated_width: int,
    l1_coefficient: float,
    settings: TrainingSettings,
) -> TrainingSAE[Any]:
    """A fresh training SAE for ``variant`` (resampling off: the comparison is of designs)."""
    common: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": round(gated_width * variant.width_factor),
        "l1_coefficient": l1_coefficient,
        "l1_warm_up_steps": int(settings.steps * settings.l1_warm_up_fraction),
        "device": settings.device,
    }
    if variant.architecture == "standard":
        return StandardTrainingSAE(
            StandardTrainingSAEConfig(**common, **variant.overrides)
        )
    gated: dict[str, Any] = {
        "resample_dead": False,
        "sparse_step": settings.sparse_step,
        **common,
        **variant.overrides,
    }
    if variant.architecture == "gated_untied":
        return GatedUntiedTrainingSAE(GatedUntiedTrainingSAEConfig(**gated))
    return GatedTrainingSAE(GatedTrainingSAEConfig(**gated))


class SyntheticSource:
    """Synthetic activations with known ground-truth features (SAELens's synthetic model).

    Args:
        model_cfg: The synthetic model (its ``seed`` fixes the feature directions).
        eval_samples: Size of the held-out evaluation set.
        eval_seed: Seed of the evaluation set.
        device: Torch device.
    """

    def __init__(
        self,
        model_cfg: SyntheticModelConfig,
        eval_samples: int,
        eval_seed: int = EVAL_SEED,
        device: str = "cpu",
    ) -> None:
        self.model = SyntheticModel(model_cfg, device=device)
        self.d_in = model_cfg.hidden_dim
        # A fixed evaluation set that leaves the training RNG streams untouched.
        target = torch.device(device)
        gpus = [target.index or 0] if target.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):
            torch.manual_seed(eval_seed)
            true_acts = self.model.activation_generator.sample(eval_samples)
            self.eval_x = self.model.feature_dict(true_acts)
        self.true_l0 = float((true_acts > 0).float().sum(dim=-1).mean())
        self.ground_truth = self.model.feature_dict.feature_vectors

    def train(self, sae: TrainingSAE[Any], settings: TrainingSettings) -> None:
        data = SyntheticActivationIterator(
            self.model.feature_dict,
            self.model.activation_generator,
            settings.batch_size,
        )
        SAETrainer(cfg=trainer_config(settings), sae=sae, data_provider=data).fit()


class LanguageModelSource:
    """Activations of a TransformerLens model at one hook, through SAELens's runner.

    Args:
        runner_fields: ``LanguageModelSAERunnerConfig`` fields other than ``sae`` and the
            optimizer settings (``model_name``, ``hook_name``, ``dataset_path``,
            ``context_size`` ...).
        eval_batches: Store batches of activations held out for evaluation.
        override_model: A loaded model to use instead of ``model_name`` (tests, notebooks).
        override_dataset: A dataset to use instead of ``dataset_path``.
    """

    def __init__(
        self,
        runner_fields: dict[str, Any],
        eval_batches: int = 4,
        override_model: Any = None,
        override_dataset: Any = None,
    ) -> None:
        self.runner_fields = runner_fields
        self.override_dataset = override_dataset
        if override_model is None:
            from sae_lens.load_model import load_model

            override_model = load_model(
                runner_fields.get("model_class_name", "HookedTransformer"),
                runner_fields["model_name"],
                device=runner_fields.get("device", "cpu"),
            )
        self.model = override_model
        self.d_in = self._hook_width()
        probe_cfg = StandardTrainingSAEConfig(d_in=self.d_in, d_sae=1)
        store = ActivationsStore.from_config(
            self.model,
            self._runner_config(probe_cfg, TrainingSettings()),
            override_dataset=override_dataset,
        )
        self.eval_x = torch.cat([store.next_batch() for _ in range(eval_batches)])
        self.ground_truth: torch.Tensor | None = None

    def _hook_width(self) -> int:
        hook = self.runner_fields["hook_name"]
        tokens = torch.zeros((1, 2), dtype=torch.long)
        _, cache = self.model.run_with_cache(tokens, names_filter=[hook])
        return int(cache[hook].shape[-1])

    def _runner_config(
        self, sae_cfg: Any, settings: TrainingSettings
    ) -> LanguageModelSAERunnerConfig[Any]:
        fields: dict[str, Any] = {
            "logger": LoggingConfig(log_to_wandb=False),
            "checkpoint_path": None,
            "output_path": None,
            "verbose": False,
            **self.runner_fields,
            # SAELens needs its shuffle buffer to hold at least one training batch.
            "n_batches_in_buffer": max(
                self.runner_fields.get("n_batches_in_buffer", 20),
                math.ceil(2 * settings.batch_size / self.runner_fields["context_size"]),
            ),
            **settings.optimizer_fields(),
            "train_batch_size_tokens": settings.batch_size,
            "training_tokens": settings.steps * settings.batch_size,
            "device": settings.device,
        }
        return LanguageModelSAERunnerConfig(sae=sae_cfg, **fields)

    def train(self, sae: TrainingSAE[Any], settings: TrainingSettings) -> None:
        LanguageModelSAETrainingRunner(
            self._runner_config(sae.cfg, settings),
            override_model=self.model,
            override_dataset=self.override_dataset,
            override_sae=sae,
        ).run()

    def train_together(
        self, saes: dict[str, TrainingSAE[Any]], settings: TrainingSettings
    ) -> None:
        """Train ``saes`` from one activation stream (one model forward pass per batch for
        all of them) with SAELens's ``MultiSAETrainingRunner``."""
        first = next(iter(saes.values()))
        cfg = multi_config(
            self._runner_config(first.cfg, settings),
            {name: sae.cfg for name, sae in saes.items()},
        )
        MultiSAETrainingRunner(
            cfg,
            override_model=self.model,
            override_dataset=self.override_dataset,
            override_saes=dict(saes),
        ).run()


ActivationSource = SyntheticSource | LanguageModelSource


def check_device(device: str) -> None:
    """Raise ``ValueError`` unless ``device`` names a torch device this machine has.

    Catches what would otherwise fail only once work has started: a misspelled device, CUDA
    on a machine without it, or a GPU index past the last GPU.

    Args:
        device: A torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` ...).
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Unknown device {device!r}; use cpu, cuda, cuda:N or mps."
        ) from None
    if target.type == "cpu":
        return
    if target.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"Device {device!r} is not available on this machine.")
        return
    backend: Any = getattr(torch, target.type, None)  # torch.cuda, torch.xpu ...
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(
            f"Device {device!r} is not available: PyTorch sees no {target.type} device "
            "on this machine."
        )
    count = int(backend.device_count())
    if target.index is not None and target.index >= count:
        raise ValueError(
            f"Device {device!r} is not available: this machine has {count} "
            f"{target.type} device(s), {target.type}:0 to {target.type}:{count - 1}."
        )


def check_counts(**counts: int | None) -> None:
    """Raise ``ValueError`` naming the first count below 1 (``None`` means a default)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")


def check_positive(**values: float) -> None:
    """Raise ``ValueError`` naming the first value that is not finite and above 0."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number above 0, got {value}.")


def check_coefficients(name: str, values: Sequence[float] | None) -> None:
    """Raise ``ValueError`` unless ``values`` (``None``: a default) are sparsity
    coefficients: at least one, each finite and at least 0."""
    if values is None:
        return
    if len(values) == 0:
        raise ValueError(f"{name} needs at least one value.")
    for value in values:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"{name} must be finite and at least 0, got {value} (lambda, the "
                "sparsity coefficient)."
            )


def prepare_output_folder(path: Path, overwrite: bool = False) -> None:
    """Create the folder ``path`` for new results, before any work is done.

    A folder that exists and is not empty is refused (results and saved SAEs are never
    overwritten by accident) unless ``overwrite`` is set; then files of the same names in it
    are replaced. Creating the folder first also surfaces an unwritable location before
    training rather than after it.

    Args:
        path: The output folder.
        overwrite: Write into an existing non-empty folder.

    Raises:
        OSError: ``path`` is a file, an existing non-empty folder (without ``overwrite``), or
            cannot be created.
    """
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"Refusing to write to {path}: it is a file, not a folder."
        )
    if not overwrite:
        try:
            check_new_folder(path)
        except FileExistsError as error:
            raise FileExistsError(
                f"{error} Choose a new folder, or pass --overwrite (overwrite=True) to "
                "replace the files in it."
            ) from None
    path.mkdir(parents=True, exist_ok=True)


@dataclass
class SourceConfig:
    """Where ``demo`` and ``sweep`` take their activations from.

    Args:
        gated_width: Dictionary size of the gated SAEs on synthetic data (the baseline gets
            1.5x).
        device: Torch device.
        synthetic_model: Ground-truth generator (embedded default).
        model: TransformerLens model name: train on its activations instead (needs the
            network, through SAELens's runner and activation store).
        hook: Hook name for ``model``.
        dataset: Tokenized Hugging Face dataset for ``model``.
        context_size: Tokens per prompt for ``model``.
        expansion: Gated dictionary size as a multiple of the hook width for ``model``.
        sparse_step: Training steps of the gated SAEs on the open gates only: ``auto``
            (when few gates are open), ``always`` or ``never`` (dense steps only).
    """

    gated_width: int = 256
    device: str = "cpu"
    # "cmd": False keeps this nested config off the command line (simple_parsing's marker).
    synthetic_model: SyntheticModelConfig = field(
        default_factory=lambda: DEFAULT_SYNTHETIC_MODEL, metadata={"cmd": False}
    )
    model: str | None = None
    hook: str | None = None
    dataset: str = "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"
    context_size: int = 128
    expansion: float = 8.0
    sparse_step: SparseStep = "auto"

    def __post_init__(self) -> None:
        if (self.model is None) != (self.hook is None):
            raise ValueError(
                "Give both --model and --hook to train on a language model."
            )
        check_counts(gated_width=self.gated_width, context_size=self.context_size)
        check_positive(expansion=self.expansion)
        if self.sparse_step not in SPARSE_STEP_OPTIONS:
            raise ValueError(
                f"sparse_step must be one of {list(SPARSE_STEP_OPTIONS)}, got "
                f"{self.sparse_step!r}."
            )
        check_device(self.device)

    def record(self) -> dict[str, Any]:
        """These settings as JSON values: paths as text, the synthetic model only if used."""
        record = {
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()
        }
        record["synthetic_model"] = (
            None if self.model else self.synthetic_model.to_dict()
        )
        return record


def make_source(
    cfg: SourceConfig,
    eval_samples: int,
    override_model: Any = None,
    override_dataset: Any = None,
) -> tuple[ActivationSource, int]:
    """The activation source and the gated dictionary size for ``demo`` and ``sweep``.

    Synthetic data unless ``cfg`` names a model (or one is passed as ``override_model``);
    then the model's activations at ``cfg.hook``, and a gated width of ``cfg.expansion``
    times their width.

    Args:
        cfg: The source settings.
        eval_samples: Held-out synthetic activations for the metrics.
        override_model: An already built ``HookedTransformer`` to use instead of ``cfg.model``.
        override_dataset: An in-memory tokenized dataset to use instead of ``cfg.dataset``.
    """
    if cfg.model is None and override_model is None:
        source = SyntheticSource(cfg.synthetic_model, eval_samples, device=cfg.device)
        return source, cfg.gated_width
    if cfg.hook is None:
        raise ValueError("Give a hook (--hook) to train on a model's activations.")
    lm = LanguageModelSource(
        {
            "model_name": cfg.model or "override",
            "hook_name": cfg.hook,
            "dataset_path": cfg.dataset,
            "context_size": cfg.context_size,
            "is_dataset_tokenized": True,
            "streaming": override_dataset is None,
            "device": cfg.device,
        },
        override_model=override_model,
        override_dataset=override_dataset,
    )
    return lm, round(cfg.expansion * lm.d_in)


def train_sae(
    variant: Variant,
    l1_coefficient: float,
    seed: int,
    source: ActivationSource,
    gated_width: int,
    settings: TrainingSettings,
) -> tuple[TrainingSAE[Any], float]:
    """Train one SAE from a fixed seed; return it and the training time in seconds."""
    torch.manual_seed(seed)
    sae = build_training_sae(
        variant, source.d_in, gated_width, l1_coefficient, settings
    )
    start = time.perf_counter()
    source.train(sae, settings)
    return sae, time.perf_counter() - start


def train_and_evaluate(
    variant: Variant,
    l1_coefficient: float,
    seed: int,
    source: ActivationSource,
    gated_width: int,
    settings: TrainingSettings,
) -> RunResult:
    """Train one SAE from a fixed seed and measure it on the source's held-out set."""
    sae, seconds = train_sae(
        variant, l1_coefficient, seed, source, gated_width, settings
    )
    return evaluate(sae, variant, l1_coefficient, seed, source, seconds)


@torch.no_grad()
def evaluate(
    sae: TrainingSAE[Any],
    variant: Variant,
    l1_coefficient: float,
    seed: int,
    source: ActivationSource,
    seconds: float,
) -> RunResult:
    """The metrics of :class:`RunResult` for a trained SAE."""
    sae.eval()
    x = source.eval_x.to(sae.device)
    features, reconstructions = [], []
    for chunk in x.split(8192):
        f = sae.encode(chunk)
        features.append(f)
        reconstructions.append(sae.decode(f))
    f, x_hat = torch.cat(features), torch.cat(reconstructions)
    errors = (x_hat - x).pow(2).sum(dim=-1)
    variance = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean()
    active = f > 0
    nonzero = f[active].float().cpu()
    counts = torch.histogram(
        nonzero.clamp(max=MAGNITUDE_BINS[-1]), torch.tensor(MAGNITUDE_BINS)
    )
    mcc = None
    if source.ground_truth is not None:
        mcc = float(mean_correlation_coefficient(sae.W_dec, source.ground_truth))
    return RunResult(
        variant=variant.name,
        architecture=sae.cfg.architecture(),
        l1_coefficient=l1_coefficient,
        seed=seed,
        d_sae=sae.cfg.d_sae,
        l0=float(active.float().sum(dim=-1).mean()),
        mse=float(errors.mean()),
        explained_variance=float(1 - errors.mean() / variance),
        relative_reconstruction_bias=_gamma_or_nan(x, x_hat),
        dead_fraction=float((~active.any(dim=0)).float().mean()),
        ground_truth_mcc=mcc,
        seconds=seconds,
        magnitude_histogram=[int(c) for c in counts.hist.tolist()],
    )


def run_grid(
    variants: list[Variant],
    grid: dict[str, tuple[float, ...]],
    seeds: list[int],
    source: ActivationSource,
    gated_width: int,
    settings: TrainingSettings,
    progress: bool = True,
) -> Iterator[RunResult]:
    """Train every (variant, lambda, seed) combination, with a progress bar over runs.

    On a language model's activations, all the SAEs of one seed train from one activation
    stream (:meth:`LanguageModelSource.train_together`), each from the weights it would
    start from alone; their ``seconds`` is an equal share of that run's time.
    """
    if isinstance(source, LanguageModelSource):
        yield from _run_grid_together(
            variants, grid, seeds, source, gated_width, settings, progress
        )
        return
    jobs = [(v, l1, s) for v in variants for l1 in grid[v.name] for s in seeds]
    bar = tqdm(jobs, desc="runs", disable=not progress)
    for variant, l1, seed in bar:
        bar.set_postfix_str(f"{variant.name} lambda={l1} seed={seed}")
        yield train_and_evaluate(variant, l1, seed, source, gated_width, settings)


def _run_grid_together(
    variants: list[Variant],
    grid: dict[str, tuple[float, ...]],
    seeds: list[int],
    source: LanguageModelSource,
    gated_width: int,
    settings: TrainingSettings,
    progress: bool,
) -> Iterator[RunResult]:
    jobs = [(v, l1) for v in variants for l1 in grid[v.name]]
    bar = tqdm(seeds, desc="activation streams", disable=not progress)
    for seed in bar:
        bar.set_postfix_str(f"{len(jobs)} SAEs, seed={seed}")
        saes: dict[str, TrainingSAE[Any]] = {}
        for variant, l1 in jobs:
            torch.manual_seed(seed)  # the weights this SAE would start from alone
            saes[f"{variant.name} lambda={l1!r}"] = build_training_sae(
                variant, source.d_in, gated_width, l1, settings
            )
        torch.manual_seed(seed)
        start = time.perf_counter()
        source.train_together(saes, settings)
        seconds = (time.perf_counter() - start) / len(saes)
        for (variant, l1), sae in zip(jobs, saes.values()):
            yield evaluate(sae, variant, l1, seed, source, seconds)


def _gamma_or_nan(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    try:
        return relative_reconstruction_bias(x, x_hat)
    except ValueError:  # x_hat == 0 everywhere: every feature dead
        return math.nan


def trainer_config(settings: TrainingSettings, **overrides: Any) -> SAETrainerConfig:
    """A ``SAETrainerConfig`` for ``settings``: no checkpoints, no W&B.

    Args:
        settings: Steps, batch size, learning rate and device.
        overrides: ``SAETrainerConfig`` fields to set differently.
    """
    fields: dict[str, Any] = {
        "total_training_samples": settings.steps * settings.batch_size,
        "train_batch_size_samples": settings.batch_size,
        **settings.optimizer_fields(),
        "lr_end": settings.lr / 10,
        "lr_scheduler_name": "constant",
        "lr_decay_steps": 0,
        "n_restart_cycles": 1,
        "device": settings.device,
        "autocast": False,
        "dead_feature_window": max(1, settings.steps // 10),
        "feature_sampling_window": max(1, settings.steps // 10),
        "n_checkpoints": 0,
        "checkpoint_path": None,
        "save_final_checkpoint": False,
        "logger": LoggingConfig(log_to_wandb=False),
        "n_batches_for_norm_estimate": 10,
    }
    return SAETrainerConfig(**{**fields, **overrides})

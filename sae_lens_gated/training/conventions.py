"""The paper's training conventions, run inside SAELens's unmodified trainer.

SAELens's ``SAETrainer`` owns its optimizer and its loop and offers no callbacks. Everything
a gated training SAE needs beyond its loss therefore lives here, in one object the SAE owns,
:class:`TrainingConventions`. The SAE calls it from ``training_forward_pass`` (the one place
the trainer hands it each batch); PyTorch's global optimizer step hooks call it around every
``step()`` of an optimizer that holds the SAE's parameters:

- before the step: refuse a non-finite batch, loss or gradient (nothing is updated); put
  back the gradient the trainer clipped (``clip_grad_norm=False``); remove the gradient
  component parallel to each decoder row (``unit_norm_decoder``); lower the learning rate
  while it re-warms after a resampling event;
- after the step: restore the scheduled learning rate, renormalize decoder rows, and run a
  resampling event when one is due.

Before the first step it also switches the trainer's Adam to PyTorch's fused kernel
(``fused_optimizer``; :mod:`~sae_lens_gated.training.fused_adam`).

It also saves and restores the resampler's state with SAELens's checkpoints and logs the
extra W&B values. Training across processes (:mod:`sae_lens_gated.distributed`) plugs in
through :meth:`TrainingConventions.use_parallel`. When SAELens grows step callbacks, this
module is what changes (docs/maintainers.md maps each piece onto the seam that would
replace it).
"""

import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from numpy.typing import NDArray
from safetensors import safe_open
from safetensors.torch import save_file
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from sae_lens_gated.metrics import relative_reconstruction_bias_tensor, widest_float
from sae_lens_gated.saes.gated_encoder import GatedEncoding
from sae_lens_gated.training.batch_guard import BatchGuard
from sae_lens_gated.training.fused_adam import fuse_adam_groups, unfuse_adam_groups
from sae_lens_gated.training.grad_clip import GradientClipUndo
from sae_lens_gated.training.resampling import DeadFeatureResampler, ResampleTarget
from sae_lens_gated.training.sparse_policy import (
    SPARSE_POLICY_STATE_FILENAME,
    SparseStepPolicy,
    sparse_step_problem,
)

logger = logging.getLogger(__name__)

RESAMPLER_STATE_FILENAME = "gated_resampler_state.safetensors"


def has_conventions_state(folder: str | Path) -> bool:
    """Whether ``folder`` holds a resampler or sparse-step policy state."""
    folder = Path(folder)
    return any(
        (folder / name).exists()
        for name in (RESAMPLER_STATE_FILENAME, SPARSE_POLICY_STATE_FILENAME)
    )


class ConventionsConfig(Protocol):
    """The config fields the conventions read (``GatedTrainingSAEConfig`` has them)."""

    d_sae: int
    unit_norm_decoder: bool | None
    clip_grad_norm: bool
    fused_optimizer: bool
    resample_dead: bool | None

    @property
    def sparse_step(self) -> str: ...

    def resampling_schedule(self) -> Any: ...


class ConventionsTarget(ResampleTarget, Protocol):
    """What the conventions need from the SAE that owns them."""

    @property
    def cfg(self) -> ConventionsConfig: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.nn.Parameter]]: ...


class ParallelPlan(Protocol):
    """What a multi-process training plan (:mod:`sae_lens_gated.distributed`) hooks into."""

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        """Hook the gradients of ``params`` (replacing earlier hooks; none for ``[]``).

        Called before the clip undo attaches, so these hooks run before its hooks.
        """
        ...

    def before_step(self) -> None:
        """Run first in the optimizer pre-step hook, before any other check or change."""
        ...

    def after_step(self) -> None:
        """Run first in the optimizer post-step hook, before renormalization and resampling."""
        ...


class TrainingConventions:
    """Per-step work the paper's recipe needs that SAELens's trainer cannot be asked for.

    Args:
        sae: The training SAE that owns this object.
    """

    def __init__(self, sae: ConventionsTarget) -> None:
        self.sae = sae
        self.resampler: DeadFeatureResampler | None = None
        if sae.cfg.resample_dead:
            seed = int(torch.randint(0, 2**62, ()).item())
            self.resampler = DeadFeatureResampler(
                sae.cfg.resampling_schedule(), sae.cfg.d_sae, seed
            )
        self.sparse_policy = SparseStepPolicy()
        self._reset_transient_state()
        self.attach()

    def _reset_transient_state(self) -> None:
        # State tied to this process and these parameter objects: rebuilt, never copied.
        # It must not touch the SAE, which a deep copy or unpickling has not rebuilt yet.
        self.batch_guard = BatchGuard()
        self.clip_undo: GradientClipUndo | None = None
        self.parallel: ParallelPlan | None = None
        self._attached_to: tuple[weakref.ref[torch.nn.Parameter], ...] = ()
        self._logging_step: int | None = None
        self._step_metrics: dict[str, Any] | None = None
        self._open_gates: tuple[torch.Tensor, int] | None = None
        # Whether this process has checked that its device runs sparse steps.
        self._sparse_checked = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for transient in ("batch_guard", "clip_undo", "parallel", "_attached_to"):
            state.pop(transient)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A deep copy or an unpickled SAE: re-attached at its first training step, when
        # its parameters exist.
        self.__dict__.update(state)
        self._reset_transient_state()

    def attach(self) -> None:
        """Take part in optimizer steps and hook the current parameter objects. Idempotent.

        Called at construction and at every training step, so the conventions follow
        parameter objects that loading replaced, deep copies and unpickled SAEs.
        """
        _install_optimizer_hooks()
        _LISTENERS.add(self)
        if self.clip_undo is None and not self.sae.cfg.clip_grad_norm:
            self.clip_undo = GradientClipUndo()
            self._attached_to = ()
        params = list(self.sae.parameters())
        if len(params) == len(self._attached_to) and all(
            ref() is p for ref, p in zip(self._attached_to, params)
        ):
            return
        if self.parallel is not None:
            self.parallel.attach(params)
        if self.clip_undo is not None:
            self.clip_undo.attach(params)
        self._attached_to = tuple(weakref.ref(p) for p in params)

    def use_parallel(self, plan: ParallelPlan | None) -> None:
        """Train as one process of several under ``plan`` (None: alone again).

        Re-hooks the parameters so that the plan's gradient hooks run first.
        """
        if self.parallel is not None:
            self.parallel.attach([])
        self.parallel = plan
        self._attached_to = ()
        self.attach()

    # ---- inside training_forward_pass ---------------------------------------------------

    def start_step(self, sae_in: torch.Tensor, logging_step: int | None) -> None:
        """Check the batch and remember whether this is a logging step.

        Args:
            sae_in: The training batch.
            logging_step: The step number if the trainer logs this step, else None.
        """
        if not torch.compiler.is_compiling():
            self.attach()
        self.batch_guard.check_batch(sae_in)
        self._logging_step = logging_step
        if not self._sparse_checked and self.sparse_step():
            self._check_sparse_support(sae_in)
        if self._auto_sparse and self.sparse_policy.times_next_step:
            self.sparse_policy.begin_step(sae_in.device)

    def end_forward(
        self,
        sae_in: torch.Tensor,
        sae_out: torch.Tensor,
        encoding: GatedEncoding,
        loss: torch.Tensor,
    ) -> dict[str, Any]:
        """Check the loss, feed the resampler, and return the step's extra metrics.

        Args:
            sae_in: The training batch.
            sae_out: Its reconstruction.
            encoding: The step's encoding (dense, or sparse after a sparse step).
            loss: The total loss.
        """
        self.batch_guard.check_loss(loss)
        if self.resampler is not None:
            self.resampler.observe(sae_in, encoding.feature_acts)
        n_rows = encoding.sae_in.numel() // encoding.sae_in.shape[-1]
        if encoding.n_open is not None:
            self._open_gates = (encoding.n_open.detach(), n_rows)
        if self._logging_step is None:
            return {}
        with torch.no_grad():
            if encoding.n_open is not None:
                gate_l0 = (
                    encoding.n_open.to(widest_float(encoding.n_open.device)) / n_rows
                )
            else:
                gate_l0 = (encoding.gate_acts > 0).float().sum(-1).mean()
            metrics: dict[str, Any] = {
                "relative_reconstruction_bias": relative_reconstruction_bias_tensor(
                    sae_in, sae_out
                ),
                "gate_l0": gate_l0,
                **(self.sparse_policy.metrics() if self._auto_sparse else {}),
            }
        # The trainer logs this dict after the optimizer step: after_step adds the
        # resampling counters of that step to it.
        self._step_metrics = metrics
        return metrics

    def _check_sparse_support(self, sae_in: torch.Tensor) -> None:
        """Before the first sparse step: rule sparse steps out, or refuse ``"always"``,
        on a device that cannot run them.

        Raises:
            ValueError: With ``sparse_step="always"``, if the device cannot run them.
        """
        self._sparse_checked = True
        problem = sparse_step_problem(sae_in.device, sae_in.dtype, self.sae.W_dec.dtype)
        if problem is None:
            return
        reason = f"the sparse step's ops fail on {sae_in.device} ({problem})"
        if self._auto_sparse:
            self.sparse_policy.rule_out_sparse(reason)
            return
        raise ValueError(
            f"sparse_step='always' cannot train here: {reason}. Use sparse_step='auto' "
            "(dense steps where sparse ones cannot run) or 'never'."
        )

    @property
    def _auto_sparse(self) -> bool:
        return self.sae.cfg.sparse_step == "auto"

    def sparse_step(self) -> bool:
        """Whether the coming training step runs on the open gates only.

        With ``sparse_step="auto"``, :class:`~sae_lens_gated.training.sparse_policy.
        SparseStepPolicy` decides from timed steps of both kinds (the first step is dense).
        """
        if not self._auto_sparse:
            return self.sae.cfg.sparse_step == "always"
        return self.sparse_policy.next_sparse()

    # ---- around the optimizer step --------------------------------------------------------

    def before_step(self) -> None:
        """Refuse non-finite values, restore clipped gradients, project decoder gradients."""
        if self._auto_sparse:
            self.sparse_policy.stop_clock()  # the backward pass has just ended
        if self.parallel is not None:
            self.parallel.before_step()
        self.batch_guard.raise_if_bad()
        named = [(n, p) for n, p in self.sae.named_parameters() if p.grad is not None]
        self.batch_guard.check_gradients(named)
        if self._open_gates is not None:
            # Read here, where the gradient check has already waited for the backward pass.
            count, n_rows = self._open_gates
            self._open_gates = None
            if self._auto_sparse:
                density = int(count) / max(1, n_rows * self.sae.cfg.d_sae)
                self.sparse_policy.end_step(density)
        if self.clip_undo is not None:
            self.clip_undo.restore([p for _, p in named])
        if self.sae.cfg.unit_norm_decoder:
            remove_parallel_decoder_grad(self.sae.W_dec)

    def lr_factor(self) -> float:
        """The learning-rate multiplier for the step about to be taken (re-warm)."""
        return 1.0 if self.resampler is None else self.resampler.lr_factor()

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Renormalize decoder rows and run a resampling event if one is due."""
        if self.parallel is not None:
            self.parallel.after_step()
        if self.sae.cfg.unit_norm_decoder:
            normalize_decoder_rows(self.sae.W_dec)
        if self.resampler is not None:
            resampled = self.resampler.n_resampled
            self.resampler.step_completed(self.sae, optimizer)
            if self.resampler.n_resampled != resampled:  # new features: new densities
                self.sparse_policy.request_decision()
            if self._step_metrics is not None:
                # Through the step's metrics, which the trainer logs under its own step
                # and a multi-SAE trainer under each SAE's prefix.
                self._step_metrics.update(
                    {
                        "resampling/n_resampled": self.resampler.n_resampled,
                        "resampling/n_events": self.resampler.n_events,
                        "resampling/lr_factor": self.resampler.lr_factor(),
                    }
                )
        self._step_metrics = None

    # ---- checkpoints and histograms -------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write the resampler's and the sparse-step policy's state next to a checkpoint."""
        if self._auto_sparse:
            self.sparse_policy.save(folder)
        if self.resampler is not None:
            save_file(
                self.resampler.state_dict(), Path(folder) / RESAMPLER_STATE_FILENAME
            )

    def load(self, folder: str | Path) -> None:
        """Restore the resampler's and the sparse-step policy's state from a checkpoint."""
        if self._auto_sparse:
            self.sparse_policy.load(folder)
        state_path = Path(folder) / RESAMPLER_STATE_FILENAME
        if self.resampler is None:
            return
        if not state_path.exists():
            logger.warning(
                "%s has no %s: resampling restarts its schedule from step 0.",
                folder,
                RESAMPLER_STATE_FILENAME,
            )
            return
        # A process that does not keep the pool (data-parallel) does not read it.
        keeps_pool = self.resampler.collectives.keeps_pool()
        try:
            with safe_open(state_path, "pt") as saved:
                state = {
                    key: saved.get_tensor(key)
                    for key in saved.keys()  # noqa: SIM118 (not iterable)
                    if key != "pool" or keeps_pool
                }
        except Exception as error:
            raise ValueError(
                f"Could not read resampler state {state_path}: {error}"
            ) from error
        self.resampler.load_state_dict(state, device=self.sae.W_dec.device)

    @torch.no_grad()
    def histograms(self) -> dict[str, NDArray[Any]]:
        """Per-feature values for W&B histograms: decoder and extra encoder norms, biases.

        In float64: numpy cannot cut 64 bins out of float32 values that lie within a few
        ulps of each other, which is what unit-norm decoder rows do.
        """
        values = {"weights/W_dec_norms": self.sae.W_dec.norm(dim=1)}
        names = {id(p): name for name, p in self.sae.named_parameters()}
        for matrix in self.sae.encoder_matrices()[1:]:
            values[f"weights/{names[id(matrix)]}_norms"] = matrix.norm(dim=0)
        for parameter in self.sae.per_feature_encoder_parameters():
            values[f"weights/{names[id(parameter)]}"] = parameter
        return {k: v.detach().cpu().double().numpy() for k, v in values.items()}


@torch.no_grad()
def remove_parallel_decoder_grad(W_dec: torch.Tensor) -> None:
    """Project each ``W_dec`` row's gradient onto the tangent space of its row sphere.

    Row dot products as a batched matmul and an in-place update: no ``(d_sae, d_in)``
    temporary, which would be 9 GiB at ``d_sae`` 2**20 and ``d_in`` 2304 in float32.
    """
    grad = W_dec.grad
    if grad is None:
        return
    dots = torch.bmm(grad.unsqueeze(1), W_dec.unsqueeze(2)).flatten()
    norms_sq = torch.linalg.vector_norm(W_dec, dim=1).square().clamp_min(1e-12)
    grad.addcmul_(W_dec, (dots / norms_sq).unsqueeze(1), value=-1)


@torch.no_grad()
def normalize_decoder_rows(W_dec: torch.Tensor) -> None:
    """Rescale every ``W_dec`` row to unit norm, in place (keeps optimizer state bound)."""
    W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


# ---- PyTorch's global optimizer step hooks --------------------------------------------------
# Installed once; at each step they find the conventions whose SAE parameters the stepping
# optimizer holds, by parameter identity, so they keep working after loading replaces
# parameter objects, on resume (a new optimizer), and with any training loop.

_LISTENERS: "weakref.WeakSet[TrainingConventions]" = weakref.WeakSet()
_HOOK_HANDLES: list[RemovableHandle] = []
# Learning rates a step lowered for a re-warm, restored right after that step.
_SCHEDULED_LRS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list[tuple[dict[str, Any], float]]]" = weakref.WeakKeyDictionary()


def _install_optimizer_hooks() -> None:
    if not _HOOK_HANDLES:
        _HOOK_HANDLES.append(register_optimizer_step_pre_hook(_before_step))
        _HOOK_HANDLES.append(register_optimizer_step_post_hook(_after_step))


def listeners_of(optimizer: torch.optim.Optimizer) -> list[TrainingConventions]:
    """The live conventions whose SAE has at least one parameter ``optimizer`` updates."""
    if not _LISTENERS:
        return []
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [
        listener
        for listener in list(_LISTENERS)
        if any(id(p) in held for p in listener.sae.parameters())
    ]


def _before_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    listeners = listeners_of(optimizer)
    for listener in listeners:  # every check runs before anything is changed
        listener.before_step()
    fused: set[int] = set()
    default: set[int] = set()
    for listener in listeners:
        ids = fused if listener.sae.cfg.fused_optimizer else default
        ids.update(map(id, listener.sae.parameters()))
    if fused:
        fuse_adam_groups(optimizer, fused)
    if default:  # a resumed run whose checkpoint the plugin had fused goes back
        unfuse_adam_groups(optimizer, default)
    # One factor per param group, however many SAEs share it: the lowest (most cautious)
    # re-warm of the SAEs with parameters in the group. Each group's scheduled LR is
    # snapshotted once and restored once, after the step.
    snapshot: list[tuple[dict[str, Any], float]] = []
    for group in optimizer.param_groups:
        in_group = {id(p) for p in group["params"]}
        factors = [
            listener.lr_factor()
            for listener in listeners
            if any(id(p) in in_group for p in listener.sae.parameters())
        ]
        factor = min(factors, default=1.0)
        if factor != 1.0:
            snapshot.append((group, group["lr"]))
            group["lr"] = group["lr"] * factor
    if snapshot:
        _SCHEDULED_LRS[optimizer] = snapshot


def _after_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for group, lr in _SCHEDULED_LRS.pop(optimizer, []):
        group["lr"] = lr
    for listener in listeners_of(optimizer):
        listener.after_step(optimizer)

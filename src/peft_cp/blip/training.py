"""A small Accelerate training loop shared by the retrieval and question-answering recipes.

AdamW on the trainable parameters, cosine decay to zero over the optimizer steps of the run, one
checkpoint per epoch (adapter, optimizer, scheduler, progress) written atomically, `resume=True` to
continue from the last complete one (under FSDP too: the sharded optimizer state is gathered
whole), and the best adapter by a validation metric saved with `save_pretrained` (also
atomically), optionally loaded back into the model at the end. `finish_run` ends a distributed
run cleanly.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object, set_seed
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from ..saving import save_adapter, write_folder_atomic

logger = get_logger(__name__)

CHECKPOINTS = "checkpoints"
BEST = "best_adapter"

# Modules with functions that take the world process group as a default argument. Imported once the
# group exists (DDP and Accelerate import them lazily), they hold it alive past its destruction, and
# with it the group's worker threads (see `finish_run`); imported before, their default is None.
_WORLD_GROUP_DEFAULTS = {"torch.distributed.nn": "torch", "deepspeed.comm": "deepspeed"}
if dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    for _module, _package in _WORLD_GROUP_DEFAULTS.items():
        if importlib.util.find_spec(_package) is None:
            continue
        try:
            importlib.import_module(_module)
        except Exception as error:  # a broken optional install must not stop runs without it
            # Accelerate's logger needs its state, which does not exist yet at import.
            logging.getLogger(__name__).debug("%s not imported early: %r", _module, error)


@dataclass
class TrainingArguments:
    """Optimisation and bookkeeping settings of `fit` (per-process batch size).

    The gradient accumulation in force is the Accelerator's (its `gradient_accumulation_steps`
    argument, or a DeepSpeed config's); `gradient_accumulation_steps` here should match it, and
    `fit` warns when it does not. Besides the checkpoint at the end of every epoch,
    `save_every_steps` writes one every that many optimizer steps, from which `resume` continues
    inside the epoch (only the latest of these is kept). That continuation is exact unless the
    data loader draws random augmentations: the remaining batches then get other ones.
    """

    output_dir: str
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    num_workers: int = 0
    max_steps: int | None = None
    save_every_steps: int | None = None

    @classmethod
    def from_command_line(
        cls, args: argparse.Namespace, accelerator: Accelerator, output_dir: str | os.PathLike
    ) -> TrainingArguments:
        """The settings of the example scripts' shared options (`--epochs`, `--batch-size`,
        `--learning-rate`, `--weight-decay`, `--seed`, `--resume`, `--max-steps`,
        `--save-every-steps`, `--num-workers`), with the Accelerator's gradient accumulation and
        mixed precision. The offline demo (`args.demo`) loads its data in the main process.
        """
        return cls(
            output_dir=str(output_dir),
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
            seed=args.seed,
            resume=args.resume,
            max_steps=args.max_steps,
            save_every_steps=args.save_every_steps,
            num_workers=0 if args.demo else args.num_workers,
            mixed_precision=accelerator.mixed_precision,
        )


@dataclass
class FitResult:
    """What `fit` did: the metrics of each evaluation and the best one."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    steps: int = 0


def _steps_per_epoch(
    num_samples: int, batch_size: int, num_processes: int, accumulation: int
) -> int:
    """Optimizer steps in one epoch of the loader that `fit` builds.

    Each process gets num_samples // (batch_size * num_processes) full batches (the remainder is
    dropped; a set smaller than one global batch gives one short batch), and Accelerate steps the
    optimizer every `accumulation` batches and on the last batch of the epoch.
    """
    batches = max(1, num_samples // (batch_size * num_processes))
    return math.ceil(batches / accumulation)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _latest_checkpoint(output_dir: Path) -> Path | None:
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    complete = [p for p in folder.iterdir() if (p / "trainer_state.json").is_file()]
    return max(complete, key=_checkpoint_order, default=None)


def _checkpoint_order(folder: Path) -> tuple[int, int, bool]:
    # The most optimizer steps wins; at equal steps an epoch's end beats a point inside it.
    state = json.loads((folder / "trainer_state.json").read_text())
    return state["steps"], state["epoch"], state.get("batches_done") is None


def _save_checkpoint(
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    output_dir: Path,
    state: dict[str, Any],
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    name = f"epoch_{state['epoch']}"
    if state.get("batches_done") is not None:
        name += f"_step_{state['steps']}"

    def write(folder: Path) -> None:
        tensors = {k: v.detach().cpu().clone() for k, v in adapter.items()}
        save_file(tensors, folder / "adapter.safetensors")
        torch.save(optimizer_state, folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        if rng_states is not None:
            torch.save(rng_states, folder / "rng.pt")
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))

    # A crash mid-save leaves the last complete checkpoint as it was.
    final = write_folder_atomic(output_dir / CHECKPOINTS / name, write)
    # Checkpoints inside an epoch are there to lose less work; each one supersedes the older.
    for older in final.parent.glob("epoch_*_step_*"):
        if older != final and (older / "trainer_state.json").is_file():
            if _checkpoint_order(older) < _checkpoint_order(final):
                shutil.rmtree(older)


def _load_checkpoint(
    accelerator: Accelerator,
    model: PeftModel,
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    folder: Path,
) -> dict[str, Any]:
    state = json.loads((folder / "trainer_state.json").read_text())
    written_under = state.get("optimizer_layout", "per-index")
    if written_under != _optimizer_layout(accelerator):
        raise ValueError(
            f"{folder}: its optimizer state was written {_LAYOUTS[written_under]}, this run "
            f"needs one {_LAYOUTS[_optimizer_layout(accelerator)]}. Resume with the distributed "
            "setup (FSDP or not) that wrote it."
        )

    # Read on the CPU (`load_state_dict` copies onto the parameters' device): safetensors rejects
    # indexed CPU devices such as the "cpu:0" of multi-process CPU runs.
    adapter = load_file(folder / "adapter.safetensors")
    optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with _writable_full_parameters(wrapped):
            set_peft_model_state_dict(model, adapter, adapter_name=model.active_adapter)
        with _full_state_dicts(wrapped, rank0_only=False):
            optimizer_state = FSDP.optim_state_dict_to_load(
                wrapped, optimizer.optimizer, optimizer_state
            )
    else:
        set_peft_model_state_dict(model, adapter, adapter_name=model.active_adapter)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return state


# How a checkpoint's optimizer state is keyed, named in trainer_state.json.
_LAYOUTS = {
    "per-index": "by parameter index (a run without FSDP)",
    "fsdp-by-name": "whole and keyed by parameter name (an FSDP run)",
}


def _optimizer_layout(accelerator: Accelerator) -> str:
    return "fsdp-by-name" if accelerator.distributed_type == DistributedType.FSDP else "per-index"


def _optimizer_state(
    accelerator: Accelerator, wrapped: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The optimizer state a checkpoint holds; under FSDP collective, and whole on the main process.

    FSDP shards the state across processes: it is gathered whole, keyed by parameter name, and
    `_load_checkpoint` scatters it back.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return optimizer.state_dict()

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _full_state_dicts(wrapped, rank0_only=True):
        return FSDP.optim_state_dict(wrapped, optimizer.optimizer)


@contextmanager
def _full_state_dicts(module: nn.Module, rank0_only: bool):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # Offloading gathers onto the CPU; asked of a model already there, FSDP crashes (torch 2.13).
    offload = next(module.parameters()).device.type != "cpu"
    with FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
    ):
        yield


@dataclass
class _Run:
    """What the steps of `fit` share once the model and the optimizer are prepared."""

    accelerator: Accelerator
    args: TrainingArguments
    model: PeftModel
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    output_dir: Path
    result: FitResult = field(default_factory=FitResult)

    def checkpoint(self, epoch: int, batches_done: int | None = None, best: bool = False) -> None:
        """Checkpoint the run at the end of `epoch`, or `batches_done` batches into it (with
        `best`, also save the best adapter). Every process calls it: under FSDP the weights and
        the optimizer state are gathered, and inside an epoch each process's random state is
        kept; the main process writes."""
        accelerator, model = self.accelerator, self.model
        state = {**asdict(self.result), "epoch": epoch, "args": asdict(self.args)}
        if batches_done is not None:
            state["batches_done"] = batches_done

        full_state = {
            k.removeprefix("model."): v for k, v in accelerator.get_state_dict(self.wrapped).items()
        }
        if best and accelerator.is_main_process:
            save_adapter(model, self.output_dir / BEST, state_dict=full_state)
        optimizer_state = _optimizer_state(accelerator, self.wrapped, self.optimizer)
        rng_states = gather_object([_rng_state()]) if batches_done is not None else None

        if accelerator.is_main_process:
            adapter = get_peft_model_state_dict(
                model, state_dict=full_state, adapter_name=model.active_adapter
            )
            state["optimizer_layout"] = _optimizer_layout(accelerator)
            _save_checkpoint(
                adapter, optimizer_state, self.scheduler, self.output_dir, state, rng_states
            )
        accelerator.wait_for_everyone()


# Dropout and hard-negative sampling draw from torch's generators.
def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(accelerator: Accelerator, folder: Path) -> None:
    file = folder / "rng.pt"
    states = torch.load(file, weights_only=True)
    if len(states) != accelerator.num_processes:
        logger.warning(
            f"{file} holds the random state of {len(states)} processes, this run has "
            f"{accelerator.num_processes}: sampling from here on differs from the interrupted run."
        )
        return
    state = states[accelerator.process_index]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _LossModule(nn.Module):
    """`forward(batch)` = `loss_fn(model, batch)`: the unit that Accelerate wraps for training."""

    def __init__(self, model: PeftModel, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@contextmanager
def _no_context(module: nn.Module):
    yield


@contextmanager
def _full_parameters(module: nn.Module, writeback: bool = False):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(module, writeback=writeback):
        yield


@contextmanager
def _writable_full_parameters(module: nn.Module):
    with _full_parameters(module, writeback=True):
        yield


def _restore_best(accelerator: Accelerator, model: PeftModel, wrapped: nn.Module, folder: Path):
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        logger.warning(f"restore_best: no {file}; the model keeps its last weights.")
        return
    adapter = load_file(file)  # on the CPU, as in `_load_checkpoint`
    restore_context = (
        _writable_full_parameters
        if accelerator.distributed_type == DistributedType.FSDP
        else _no_context
    )
    with restore_context(wrapped):
        set_peft_model_state_dict(model, adapter, adapter_name=model.active_adapter)
    logger.info(f"restored the best adapter from {folder}", main_process_only=True)


def fit(
    model: PeftModel,
    train_dataset: Dataset,
    collate_fn: Callable[[list], dict[str, Any]],
    loss_fn: Callable[[PeftModel, dict[str, Any]], torch.Tensor],
    args: TrainingArguments,
    accelerator: Accelerator,
    evaluate: Callable[[PeftModel], dict[str, float]] | None = None,
    metric_key: str | None = None,
    restore_best: bool = False,
) -> FitResult:
    """Train the trainable parameters of `model` on `train_dataset`.

    `loss_fn(model, batch)` returns the scalar loss of a batch. After each epoch, `evaluate(model)`
    (run on every process) returns metrics; the adapter with the highest `metric_key` is saved
    to `<output_dir>/best_adapter` (without `evaluate`, the last one is). With `restore_best`, that
    adapter is loaded back into `model` on every process before returning, so what follows
    evaluates the best epoch rather than the last. Each epoch starts from `seed + epoch` for
    shuffling, dropout and sampling, and checkpoints inside an epoch keep the random state, so a
    resumed run ends with the same adapter as an uninterrupted one.

    The learning rate warms up linearly for `warmup_steps` and then follows a cosine to zero over
    the run's optimizer steps, counted with the Accelerator's gradient accumulation.
    """
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.gradient_accumulation_steps != accelerator.gradient_accumulation_steps:
        logger.warning(
            f"TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps} "
            f"but the Accelerator accumulates {accelerator.gradient_accumulation_steps} batches; "
            "the Accelerator's value is used. Pass the same value to both."
        )
    if args.resume and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise NotImplementedError(
            "resume is not supported yet under DeepSpeed: ZeRO shards the optimizer state across "
            "processes, checkpoints hold the main process's share only, and that state holds "
            "Python objects (its loss scaler) that weights-only loading refuses. Use DDP or FSDP "
            "to resume."
        )

    parameters = [p for p in model.parameters() if p.requires_grad]
    base_optimizer = torch.optim.AdamW(
        parameters, lr=args.learning_rate, weight_decay=args.weight_decay
    )

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Accelerate takes DeepSpeed's micro-batch size from a DataLoader prepared with the model;
        # the loaders here are prepared per epoch, later.
        plugin = accelerator.state.deepspeed_plugin
        if plugin.is_auto("train_micro_batch_size_per_gpu"):
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    # The losses call the model's submodules directly; running them inside one module's forward
    # lets DDP and FSDP see a forward pass (and synchronise the gradients of its backward).
    wrapped, optimizer = accelerator.prepare(_LossModule(model, loss_fn), base_optimizer)

    # Counted after `prepare`, which may replace the accumulation by a DeepSpeed config's.
    steps_per_epoch = _steps_per_epoch(
        len(train_dataset),
        args.batch_size,
        accelerator.num_processes,
        accelerator.gradient_accumulation_steps,
    )
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    # Stepped here once per optimizer step; a scheduler prepared by Accelerate would advance once
    # per process and step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        base_optimizer, lambda step: _cosine(step, total_steps, args.warmup_steps)
    )

    run = _Run(accelerator, args, model, wrapped, optimizer, scheduler, output_dir)
    start_epoch, batches_done, checkpoint = _resume(run) if args.resume else (0, 0, None)

    for epoch in range(start_epoch, args.epochs):
        if args.max_steps is not None and run.result.steps >= args.max_steps:
            break
        loader = _epoch_loader(accelerator, args, train_dataset, collate_fn, epoch)
        _train_epoch(run, epoch, loader, batches_done, checkpoint if batches_done else None)
        batches_done = 0  # only the first epoch of a resumed run starts inside
        _end_epoch(run, epoch, evaluate, metric_key)

    if restore_best:
        _restore_best(accelerator, model, wrapped, output_dir / BEST)
    return run.result


def _resume(run: _Run) -> tuple[int, int, Path | None]:
    """Load the latest checkpoint into `run`; returns (the epoch to start, the batches of it
    already done, the checkpoint), or (0, 0, None) when there is none."""
    checkpoint = _latest_checkpoint(run.output_dir)
    if checkpoint is None:
        logger.warning(f"resume: no checkpoint in {run.output_dir / CHECKPOINTS}; starting anew.")
        return 0, 0, None

    state = _load_checkpoint(
        run.accelerator, run.model, run.wrapped, run.optimizer, run.scheduler, checkpoint
    )
    result = run.result
    result.steps, result.history = state["steps"], state["history"]
    result.best_metric, result.best_epoch = state["best_metric"], state["best_epoch"]
    if state.get("batches_done") is None:
        start, done, where = state["epoch"] + 1, 0, f"epoch {state['epoch']} done"
    else:
        start, done = state["epoch"], state["batches_done"]
        where = f"epoch {start}, {done} batches in"
    logger.info(f"resumed from {checkpoint} ({where})", main_process_only=True)
    return start, done, checkpoint


def _epoch_loader(
    accelerator: Accelerator,
    args: TrainingArguments,
    dataset: Dataset,
    collate_fn: Callable[[list], dict[str, Any]],
    epoch: int,
) -> DataLoader:
    """The epoch's batches, shuffled from `seed + epoch`, which also seeds dropout and sampling."""
    set_seed(args.seed + epoch)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed + epoch))
    return accelerator.prepare(
        DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=args.num_workers,
            drop_last=len(dataset) > args.batch_size * accelerator.num_processes,
        )
    )


def _train_epoch(
    run: _Run,
    epoch: int,
    loader: DataLoader,
    batches_done: int = 0,
    resume_from: Path | None = None,
) -> None:
    """Train on `loader` from `batches_done` batches in (with the random state of `resume_from`),
    checkpointing every `save_every_steps` optimizer steps; stop early at `max_steps`."""
    accelerator, args, result = run.accelerator, run.args, run.result
    batches = len(loader)
    if batches_done:  # the same shuffle, less the batches already trained on
        loader = accelerator.skip_first_batches(loader, batches_done)

    run.wrapped.train()
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not accelerator.is_local_main_process)
    for batch in progress:
        if resume_from is not None:
            # Set once the loader has started (starting it draws a seed), for the first batch's
            # dropout and sampling.
            _restore_rng_state(accelerator, resume_from)
            resume_from = None
        batches_done += 1
        with accelerator.accumulate(run.wrapped):
            loss = run.wrapped(batch)
            accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue

        run.scheduler.step()
        result.steps += 1
        if result.steps % args.log_every == 0:
            logger.info(f"epoch {epoch} step {result.steps} loss {loss.item():.4f}")
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if args.max_steps is not None and result.steps >= args.max_steps:
            return
        every = args.save_every_steps
        if every and result.steps % every == 0 and batches_done < batches:
            run.checkpoint(epoch, batches_done)  # the epoch's end writes a checkpoint of its own


def _end_epoch(
    run: _Run,
    epoch: int,
    evaluate: Callable[[PeftModel], dict[str, float]] | None,
    metric_key: str | None,
) -> None:
    """Evaluate, keep the best adapter, and checkpoint the epoch."""
    accelerator, result = run.accelerator, run.result
    metrics: dict[str, Any] = {"epoch": epoch, "steps": result.steps}
    if evaluate is not None:
        # Evaluation calls submodules directly, which sharded parameters do not support.
        sharded = accelerator.distributed_type == DistributedType.FSDP
        with (_full_parameters if sharded else _no_context)(run.wrapped):
            metrics.update(evaluate(run.model))
    result.history.append(metrics)

    score = metrics.get(metric_key) if metric_key else None
    improved = evaluate is None or (
        score is not None and (result.best_metric is None or score > result.best_metric)
    )
    if improved:
        result.best_metric, result.best_epoch = score, epoch
    run.checkpoint(epoch, best=improved)


def communication_threads() -> list[str]:
    """Names of this process's gloo worker threads (read from /proc; empty where there is none)."""
    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        try:
            name = task.read_text().strip()
        except OSError:  # the thread ended while we looked
            continue
        if "gloo" in name:
            names.append(name)
    return names


def finish_run(accelerator: Accelerator) -> None:
    """Ends a run: every process waits for the others, then the process group goes away.

    Call it once nothing holds a prepared (wrapped) model any more. The group's worker threads stop
    only when its last reference goes. One that outlives the interpreter can still be freeing the
    tensors of a finished collective when Python shuts down, and the process then aborts after all
    its work is done ("terminate called without an active exception"). So Accelerate's references
    to the wrapped models and optimizers are dropped first, and what keeps the threads anyway is
    reported.
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed.comm  # DeepSpeed keeps groups of its own, released by its destroy

        deepspeed.comm.destroy_process_group()
    accelerator.end_training()

    left = communication_threads()
    if left:
        logger.warning(
            f"{len(left)} communication threads outlive the process group (something still "
            "holds a wrapped model); the process may abort at exit.",
            main_process_only=False,
        )

"""Training one model on several processes (GPUs or CPU cores, one or many machines) with PyTorch's own
distributed engine: ``torchrun`` starts the processes, :class:`~torch.nn.parallel.DistributedDataParallel`
averages the gradients.

    torchrun --nproc_per_node 4 -m mismatch train CT.nrrd --labels L.nrrd --out MODEL --batch-size 16

Nothing here is used by a plain run: :func:`init_from_env` starts ``torch.distributed`` only when torchrun
(or a launcher that sets the same variables) says ``WORLD_SIZE > 1``; otherwise :func:`current` is a
one-process :class:`Context` whose methods do nothing.

How one model is trained on ``W`` processes so that it is the same training as on one process:

- Devices: NCCL between GPUs, each process on ``cuda:LOCAL_RANK``; gloo between CPU processes.
- Batch sizes are global (``--batch-size 16`` on 4 processes: 4 labelled slices per process); they must
  be multiples of ``W``. Every process builds the same :class:`~mismatch.data.TwoStreamSampler` with the same
  seed and draws the same global :class:`~mismatch.data.BatchPlan`; process ``r`` reads and crops only the
  ``r``-th share of it (``TwoStreamSampler(shard=(r, W))``, :meth:`~mismatch.data.TwoStreamSampler.materialise`). So the shares together are exactly the batch one process draws,
  both streams keep their proportions on every process, and the sampler state is the same everywhere.
- The loss: per-sample terms (consistency MSE, cross-entropy, means over equal shares) average across
  processes exactly; the soft Dice, whose sums run over the whole batch, has its sums all-reduced
  differentiably (:attr:`Context.batch_sum`, which the loop hands to the methods in every
  :class:`~mismatch.methods.TrainingBatch`) so each process computes the global batch's Dice.
  With DDP's gradient averaging the gradient is then that of the one-process loss. The network normalises
  per sample (GroupNorm), so no batch statistics need syncing. Methods with random augmentation draw it
  per process (process 0 from the run's torch generator, others from one seeded by seed, rank and step), so
  their runs are reproducible but not identical to a one-process run; MisMatch has no augmentation.
- Stopping: SIGTERM / SIGINT set a flag on the process that gets it (torchrun forwards SIGTERM to every
  process); the flag is all-reduced before each step, so all processes stop at the same step and exactly one
  checkpoint is written.
- Files: only rank 0 writes the checkpoint, the model folder, events and progress; a checkpoint is read by
  rank 0 and sent to the others (``--resume`` needs the model folder on rank 0's machine only).
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import UserError

#: how long a process waits for the others in one collective before failing
TIMEOUT = datetime.timedelta(minutes=30)


class DataParallelNetwork(DistributedDataParallel):
    """DDP that still answers the wrapped network's own attributes (``probabilities``, ``config``...), so
    that methods can use it exactly like the bare network."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "module":   # DDP's own (private) attributes: no delegation
                raise
            return getattr(self.module, name)

    def __deepcopy__(self, memo):
        # a copy of the network (e.g. a mean teacher made from the model) is a copy of the bare network:
        # it is not trained through DDP and must not join the process group
        import copy

        return copy.deepcopy(self.module, memo)


@dataclass
class Context:
    """Where this process stands: rank, number of processes, device. The default is one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device | None = None
    #: a differentiable sum over the processes for the losses' batch sums (None for one process)
    batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, events and progress."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` for :class:`~mismatch.data.TwoStreamSampler`, None for one process."""
        return (self.rank, self.world_size) if self.distributed else None

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # -- set-up ---------------------------------------------------------------------------------------
    def check_batch(self, size: int, option: str) -> None:
        """A global batch size must split evenly over the processes."""
        if self.distributed and size % self.world_size:
            raise UserError(f"{option} {size} is the global batch, split evenly over the {self.world_size} "
                            f"processes; use a multiple of {self.world_size} (e.g. {option} "
                            f"{max(1, round(size / self.world_size)) * self.world_size})")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network for training: DDP-wrapped across processes, the network itself for one process."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DataParallelNetwork(model, device_ids=ids)

    def seed_augmentation(self, seed: int, step: int) -> None:
        """Processes other than rank 0 draw their augmentation from a generator of their own, seeded by
        ``seed``, rank and ``step`` (the first step of this run or resumption): reproducible, though a resumed
        run draws other numbers there than the uninterrupted run would have. Rank 0 keeps the run's
        generator (restored from the checkpoint on resumption)."""
        if self.distributed and self.rank > 0:
            torch.manual_seed(int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, self.rank, int(step)])
                                  .generate_state(1, np.uint64)[0] >> 1))

    def share_from_main(self, load: Callable[[], Any]) -> Any:
        """``load()`` on rank 0, its result sent to every process (a :class:`UserError` raised on rank 0 is
        raised everywhere). One process: just ``load()``."""
        if not self.distributed:
            return load()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", load())
            except UserError as exc:
                box[0] = ("user", str(exc))
            except Exception as exc:  # noqa: BLE001 - re-raised on every process below
                box[0] = ("error", f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        status, value = box[0]
        if status == "user":
            raise UserError(value)
        if status == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    # -- every step -----------------------------------------------------------------------------------
    def agree_stop(self, stop) -> bool:
        """Whether to stop now, the same answer on every process: any process's
        :class:`~mismatch.train.StopRequest` stops them all.

        One process: the request itself. Where another process asked, this one's request gets the reason."""
        if not self.distributed:
            return bool(stop.reason)
        name = stop.reason
        code = 0
        if name:
            code = int(getattr(signal.Signals, str(name), signal.SIGTERM)) if str(name).startswith("SIG") else 1
        flag = torch.tensor([code], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if code and not name:
            try:
                stop.request(f"{signal.Signals(code).name} (sent to another process)")
            except ValueError:
                stop.request("a stop request on another process")
        return bool(code)

    def mean_losses(self, loss: float, terms: dict) -> tuple[float, dict]:
        """The loss and its terms averaged over processes: the global batch's values (one process: as given)."""
        if not self.distributed:
            return loss, terms
        keys = [k for k, v in terms.items() if isinstance(v, (int, float))]
        values = torch.tensor([float(loss)] + [float(terms[k]) for k in keys], dtype=torch.float64,
                              device=self._comm_device)
        dist.all_reduce(values)
        values = (values / self.world_size).tolist()
        out = dict(terms)
        out.update(zip(keys, values[1:]))
        return values[0], out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (a no-op for one process)."""
        close()


_CURRENT = Context()


def current() -> Context:
    """The context of this process (set by :func:`init_from_env`; one process by default)."""
    return _CURRENT


def launched_by_torchrun() -> bool:
    """True when the environment asks for several processes (``WORLD_SIZE > 1``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    except ValueError:
        return False


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise UserError(f"WORLD_SIZE is set but {name} is not; start several processes with torchrun "
                        "(torchrun --nproc_per_node N -m mismatch train ...)") from None


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of a process started by torchrun: ``cuda:LOCAL_RANK`` on GPUs, else the CPU."""
    from .device import resolve_device

    name = (name or "auto").strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        resolve_device("cuda")  # the usual message when CUDA is missing
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"torchrun started process {local_rank} on this machine but it has {count} CUDA "
                            f"GPU(s); use --nproc_per_node {count} (one process per GPU)")
        return torch.device("cuda", local_rank)
    if name.startswith("cuda:"):
        raise UserError(f"--device {name}: under torchrun every process uses the GPU of its local rank "
                        "(cuda:LOCAL_RANK); give --device cuda (or auto) and choose the GPUs with "
                        "CUDA_VISIBLE_DEVICES")
    if name == "mps":
        raise UserError("--device mps: several processes need CUDA GPUs (NCCL) or the CPU (gloo); "
                        "use --device cpu, or run one process")
    resolve_device(name)  # raises the usual unknown-device error
    raise UserError(f"--device {name}: not usable with several processes; use auto, cuda or cpu")


def init_from_env(device: str = "auto") -> Context:
    """Join the process group torchrun set up (``WORLD_SIZE > 1``), or stay one process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR`` / ``MASTER_PORT``);
    picks NCCL for CUDA and gloo for the CPU; gives the context the sum that makes the Dice sums global
    (:attr:`Context.batch_sum`, over a process group of the loss's own).
    Returns the :class:`Context`, also available from :func:`current`.
    """
    global _CURRENT
    if not launched_by_torchrun():
        _CURRENT = Context()
        return _CURRENT
    if dist.is_available() and dist.is_initialized() and _CURRENT.distributed:
        return _CURRENT
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run one process (without torchrun)")
    world, rank, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    dev = rank_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    # the loss's own group: its collectives never interleave with DDP's gradient buckets
    loss_group = dist.new_group(backend=backend)
    _CURRENT = Context(rank=rank, world_size=world, local_rank=local, backend=backend, device=dev,
                       batch_sum=_make_batch_sum(loss_group))
    return _CURRENT


class _SumOverProcesses(torch.autograd.Function):
    """``all_reduce(SUM)`` with a gradient: the backward is again a sum over processes.

    Every process computes the same global loss from the summed tensor, so each process's gradient on its
    own share is ``W`` times the global loss's; DDP's average over the ``W`` processes makes it exact."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _make_batch_sum(group):
    def batch_sum(t: torch.Tensor) -> torch.Tensor:
        return _SumOverProcesses.apply(t, group)

    return batch_sum


def close() -> None:
    """Destroy the process group and forget the context (safe to call when none was started)."""
    global _CURRENT
    if _CURRENT.distributed and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    _CURRENT = Context()

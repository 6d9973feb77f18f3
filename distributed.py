"""Several processes: the process group, the shares of work, the collectives of training and evaluation, the one
writer, and FSDP2 sharding of the frozen backbone. Built only on torch.distributed; launch with torchrun (or
`accelerate launch`, which sets the same variables).

With WORLD_SIZE unset or 1 no process group is made and every helper is the identity: one process runs exactly the
code and the numbers it ran before. Under torchrun each process takes RANK, WORLD_SIZE and LOCAL_RANK from the
environment, uses gloo on CPU and nccl on CUDA (device cuda:LOCAL_RANK), and every collective is bounded by
TOKMEM_DIST_TIMEOUT seconds (default 600): a process that dies or hangs ends the others with a one-line error
(`common.JobFailed`) instead of a hang. Work is shared round robin: item i belongs to process i % WORLD_SIZE, and
`gather_in_order` puts the results back in item order.

With `shard_backbone` (FSDP2) every process must run the same number of forward calls; `lockstep()` says so, and
`work_share` pads a shorter share with dummy items (None) and `all_finished` keeps greedy decoding stepping until
every process is done.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

import common
from common import JobFailed, UserError, first_line, is_main_process, setup_logging

logger = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "TOKMEM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class _State:
    """The process's place in the job: the device collectives run on, whether forward calls go in lockstep, and
    whether a collective already failed (so a SIGTERM from the launcher adds no second line)."""

    device: torch.device = torch.device("cpu")
    lockstep: bool = False
    failing: bool = False
    timeout: float = DEFAULT_TIMEOUT_S


_state = _State()


# ----------------------------------------------------------------------------------------------------------------------
# The process group


def timeout_seconds() -> float:
    """The bound on any collective: TOKMEM_DIST_TIMEOUT seconds (default 600)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise UserError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {text!r}")
    return value


def env_world_size() -> int:
    """WORLD_SIZE as the launcher set it (1 when unset)."""
    text = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"WORLD_SIZE: expected a positive integer, got {text!r}") from None


def init_from_env(device: torch.device) -> torch.device:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the environment) and return
    this process's device: cuda:LOCAL_RANK on CUDA (backend nccl), the given CPU device otherwise (gloo). With
    WORLD_SIZE unset or 1, or once joined, nothing happens and `device` comes back."""
    if env_world_size() <= 1:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    if is_distributed():
        return device
    _state.timeout = timeout_seconds()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UserError(f"WORLD_SIZE is {env_world_size()} but {', '.join(missing)} is not set; launch with "
                        "torchrun --nproc_per_node N (or accelerate launch)")
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=_state.timeout),
                                device_id=device if device.type == "cuda" else None)
    except Exception as err:  # noqa: BLE001 - any rendezvous failure is one line
        raise JobFailed(f"cannot join the job of {env_world_size()} processes ({backend}): "
                        f"{_backend_error_gist(err)}") from None
    _state.device = device if device.type == "cuda" else torch.device("cpu")
    signal.signal(signal.SIGTERM, _on_sigterm)
    logger.info("process %d of %d (%s, %s)", rank(), world_size(), backend, device)
    return device


def _on_sigterm(signum: int, frame: Any) -> None:
    """torchrun stops the other processes with SIGTERM when one fails (or the job is interrupted): one line, then
    exit at once."""
    if not _state.failing:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: process {rank()} of {world_size()} stopped by the "
                         "launcher: another process of the job failed, or the job was interrupted\n")
        sys.stderr.flush()
    os._exit(128 + signum)


def setup_process_logging(log_file: str | os.PathLike | None = None) -> None:
    """common.setup_logging for this process: process 0 logs as one process does (stderr and `log_file`); any other
    logs warnings and errors only, to stderr, marked with its rank (known from RANK before the group is joined)."""
    if is_main_process():
        setup_logging(log_file)
    else:
        setup_logging(None, logging.WARNING, prefix=f"[process {os.environ.get('RANK')}] ")


def run_cli(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """common.run_cli for a CLI that may run under torchrun. In a job, a CLI that ends well leaves the process group
    together (`finish`), and any ending then exits the process at once with its status: a gloo process group still
    alive at interpreter shutdown aborts the process ("terminate called without an active exception") now and then.
    One process: common.run_cli itself."""
    try:
        common.run_cli(main)
    except SystemExit as stop:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if code == 0:
            finish()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def finish() -> None:
    """Leave the process group together: a barrier, so no process tears its connections down while another still
    uses them, then destroy it."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    _state.lockstep = False


def is_distributed() -> bool:
    """Whether this process is one of several (a process group of more than one is joined)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Process 0: the one writer of the run directory, logs, checkpoints and reports."""
    return rank() == 0


def lockstep() -> bool:
    """Whether every process must run the same forward calls (the backbone is sharded)."""
    return _state.lockstep and is_distributed()


def recorded_device(device: torch.device) -> str:
    """The device as config.json records it: process 0's (every process of a job compares the same on --resume)."""
    if is_distributed() and device.type == "cuda":
        return str(torch.device("cuda", 0))
    return str(device)


def _backend_error_gist(err: BaseException) -> str:
    """The gist of a backend error: its first line, without gloo's source location and its advice."""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first_line(err))
    return text.split(" This is typically caused", 1)[0].strip()


def _collective(name: str, call: Callable[[], T]) -> T:
    """Run a collective; a failure (a process died, or the timeout passed) becomes JobFailed, one line."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - whatever the backend raises, the job cannot go on
        _state.failing = True
        raise JobFailed(f"process {rank()} of {world_size()}: {name} failed, so another process of the job stopped "
                        f"or did not answer within {_state.timeout:g} s ({TIMEOUT_ENV}): {_backend_error_gist(err)}") \
            from None


# ----------------------------------------------------------------------------------------------------------------------
# Collectives


def all_reduce_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place (one flat buffer per dtype)."""
    if not is_distributed() or not tensors:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(_state.device)
        _collective("all_reduce", lambda: dist.all_reduce(flat))
        offset = 0
        for tensor in group:
            count = tensor.numel()
            tensor.copy_(flat[offset:offset + count].view_as(tensor))
            offset += count


def sum_values(values: Sequence[float]) -> list[float]:
    """Numbers summed over the processes (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    buffer = torch.tensor(list(values), dtype=torch.float64, device=_state.device)
    _collective("all_reduce", lambda: dist.all_reduce(buffer))
    return buffer.tolist()


def any_true(flag: bool) -> bool:
    """True on every process when it is true on any."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_state.device)
    _collective("all_reduce", lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
    return bool(value.item())


def all_finished(done: bool) -> bool:
    """Whether a decoding loop may stop: its own rows are done and, in lockstep, every process's are."""
    if not lockstep():
        return done
    return not any_true(not done)


def barrier() -> None:
    if is_distributed():
        _collective("barrier", dist.barrier)


def from_main(make: Callable[[], T]) -> T:
    """`make()` run on process 0 only, its result (or its UserError) handed to every process."""
    if not is_distributed():
        return make()
    payload: list[Any] = [None]
    if is_main():
        try:
            payload[0] = ("ok", make())
        except UserError as err:
            payload[0] = ("error", str(err))
    _collective("broadcast", lambda: dist.broadcast_object_list(payload, src=0))
    kind, value = payload[0]
    if kind == "error":
        raise UserError(value)
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Shares of work


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`, round robin: items rank, rank + N, rank + 2N, ... (all of them in one
    process)."""
    return list(items)[rank()::world_size()]


def work_share(count: int) -> list[int | None]:
    """The indices of `count` work items this process handles (round robin); in lockstep the share is padded with
    None (a dummy item, its result dropped) to the largest share, so every process runs as many forward calls."""
    mine: list[int | None] = list(range(rank(), count, world_size()))
    if lockstep():
        mine += [None] * (math.ceil(count / world_size()) - len(mine))
    return mine


def gather_in_order(mine: Sequence[T], total: int) -> list[T]:
    """Every process's share (`shard` order) gathered into the order of the `total` items, on every process; an item
    missing or twice is an error."""
    if not is_distributed():
        if len(mine) != total:
            raise RuntimeError(f"gather_in_order: {len(mine)} results for {total} items")
        return list(mine)
    parts: list[Any] = [None] * world_size()
    _collective("all_gather_object", lambda: dist.all_gather_object(parts, list(mine)))
    return interleave(parts, total)


def interleave(parts: Sequence[Sequence[T]], total: int) -> list[T]:
    """The results of `total` items from the round-robin shares of len(parts) processes, in item order; a share of
    the wrong size (an item missing or twice) is an error."""
    world = len(parts)
    ordered: list[Any] = [None] * total
    for source, part in enumerate(parts):
        expected = len(range(source, total, world))
        if len(part) != expected:
            raise RuntimeError(f"gather_in_order: process {source} sent {len(part)} results, expected {expected}")
        for position, item in enumerate(part):
            ordered[source + position * world] = item
    return ordered


# ----------------------------------------------------------------------------------------------------------------------
# Training batches


class _Tagged(Dataset):
    """A dataset indexed by (index, dummy): the item and whether it stands in for an empty share."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Any, bool]:
        index, dummy = key
        return self.dataset[index], dummy


class _ShareOfBatch(Sampler):
    """This process's share of every global batch of `batches`; an empty share is the batch's first sample, tagged
    as a dummy (it runs forward and backward with weight zero, so every process takes part in every collective)."""

    def __init__(self, batches: Iterable[list[int]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for indices in self.batches:
            indices = list(indices)
            mine = shard(indices)
            yield [(i, False) for i in mine] if mine else [(indices[0], True)]


def _tagged_collate(collate: Callable[[list], dict]) -> Callable[[list], dict]:
    def run(items: list[tuple[Any, bool]]) -> dict:
        batch = collate([item for item, _ in items])
        batch["dummy"] = items[0][1]
        return batch

    return run


def share_batches(loader: DataLoader) -> DataLoader:
    """A training loader whose every batch is this process's share of `loader`'s global batch: every process draws
    the same global batches (the same sampler and generator, so the same order as one process) and keeps its slice
    (`shard`). Each batch carries "dummy": True where the share is empty. One process: `loader` itself."""
    if not is_distributed():
        return loader
    return DataLoader(_Tagged(loader.dataset), batch_sampler=_ShareOfBatch(loader.batch_sampler),
                      collate_fn=_tagged_collate(loader.collate_fn), generator=loader.generator)


# ----------------------------------------------------------------------------------------------------------------------
# The frozen backbone sharded (FSDP2)


def shard_backbone(causal_lm: torch.nn.Module) -> None:
    """FSDP2 `fully_shard` on every decoder layer and on the decoder as the root; the input embedding and any LoRA
    parameters stay whole on every process (the embedding and the LM head are read outside the decoder's forward,
    and the trainable state is all-reduced by training.py). From here on forward calls go in lockstep."""
    if not is_distributed():
        logger.warning("--shard_backbone: one process, so there is nothing to shard")
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    decoder = causal_lm.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UserError(f"--shard_backbone: {type(decoder).__name__} has no list of decoder layers (.layers)")
    mesh = init_device_mesh(_state.device.type, (world_size(),))
    whole = {id(p) for name, p in causal_lm.named_parameters() if "lora_" in name}
    whole.add(id(causal_lm.get_input_embeddings().weight))
    for module in [*layers, decoder]:
        fully_shard(module, mesh=mesh, ignored_params={p for p in module.parameters() if id(p) in whole})
    _state.lockstep = True
    logger.info("backbone sharded over %d processes: %d decoder layers (FSDP2)", world_size(), len(layers))


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters of every sharded module of `model`. A forward with no backward after it leaves
    the root's parameters gathered, and the next forward would then skip a collective that a process which saved a
    checkpoint in between (process 0: the state dict reshards) still makes."""
    if not lockstep():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()

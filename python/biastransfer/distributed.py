"""Scale-out on torch.distributed: fingerprints sharded across ranks and data-parallel training.

Launch one process per rank with torchrun (or anything that sets the same variables)::

    torchrun --nproc_per_node 2 my_script.py          # one machine, 2 ranks
    torchrun --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 \\
        --nproc_per_node 8 my_script.py               # machine 0 of 2 (machine 1: node_rank 1)

and in the script::

    from biastransfer import distributed
    distributed.init_from_env()                       # gloo on CPU, NCCL with GPUs
    result = distributed.fingerprint_sharded(teacher, reference, "data.jsonl", tokenizer)
    Trainer(TrainerConfig(..., distributed=True)).fit(student, data)

The communication is torch.distributed's (gloo, NCCL): this module only decides what each rank
computes and what is summed. Every rank ends with the same result: a fingerprint equal to one
process's up to float64 summation order (1e-12 relative), and trained weights equal to a single
process's run on the same global batches. docs/scaling.md explains the costs.

A rank that dies makes the others fail with :class:`DistributedError` (naming the rank, the
operation and the likely cause) as soon as gloo notices the closed connection, and at the latest
after the process-group timeout (``timeout`` of :func:`init_from_env`, else the environment
variable ``BIASTRANSFER_DIST_TIMEOUT`` in seconds, else :data:`DEFAULT_TIMEOUT_S`).
"""
from __future__ import annotations

import datetime
import math
import os
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import _C

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "DistributedError",
    "TIMEOUT_ENV",
    "all_reduce_fingerprint",
    "all_reduce_sum",
    "barrier",
    "data_parallel_hook",
    "fingerprint_sharded",
    "info",
    "init_from_env",
    "is_initialized",
    "is_main",
    "rank",
    "shard_range",
    "shutdown",
    "world_size",
]

# Environment variable with the process-group timeout in seconds (overridden by the argument).
TIMEOUT_ENV = "BIASTRANSFER_DIST_TIMEOUT"
# Default timeout: long enough for a slow first batch (model loading, compilation) on one rank
# while the others wait in a collective, short enough that a hung rank is noticed in minutes.
DEFAULT_TIMEOUT_S = 300.0
# The variables torchrun sets that init_from_env needs.
REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("gloo", "nccl", "mpi")


class DistributedError(RuntimeError):
    """A collective failed: another rank died or stopped, the network failed, or the timeout
    passed. The message names this rank, the operation and the likely cause."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among world_size ranks, its rank on this machine
    (local_rank, the GPU it uses under NCCL), the backend, the rendezvous address and the
    collective timeout in seconds."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    master_addr: str
    master_port: int
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO: Optional[DistInfo] = None


def _env_int(env: Mapping[str, str], name: str, low: int, high: Optional[int] = None) -> int:
    if name not in env or env[name] == "":
        raise ValueError(
            f"environment variable {name} is not set; launch with torchrun (python -m "
            f"torch.distributed.run --nproc_per_node N script.py) or set "
            f"{', '.join(REQUIRED_ENV)}")
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        raise ValueError(
            f"environment variable {name}: expected an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"environment variable {name}: expected {bound}, got {value}")
    return value


def _timeout_seconds(timeout: Optional[float], env: Mapping[str, str]) -> float:
    if timeout is None:
        text = env.get(TIMEOUT_ENV, "")
        if text == "":
            return DEFAULT_TIMEOUT_S
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"environment variable {TIMEOUT_ENV}: expected seconds (a number), "
                             f"got {text!r}") from None
        where = f"environment variable {TIMEOUT_ENV}"
    else:
        if isinstance(timeout, datetime.timedelta):
            timeout = timeout.total_seconds()
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout: expected seconds (a number) or a timedelta, got "
                            f"{type(timeout).__name__}")
        where = "timeout"
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"{where}: expected a finite number of seconds > 0, got {timeout}")
    return float(timeout)


def _default_backend() -> str:
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    available = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available,
                 "mpi": dist.is_mpi_available}[backend]()
    if not available:
        raise ValueError(f"backend: {backend!r} is not available in this torch build")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend: 'nccl' needs CUDA GPUs, and torch sees none; use 'gloo'")
    return backend


def init_from_env(backend: Optional[str] = None, timeout: Optional[float] = None,
                  env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Joins the process group described by torchrun's variables RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT (LOCAL_RANK optional, default RANK) and returns this process's :class:`DistInfo`.

    backend: "gloo" (CPU), "nccl" (GPUs; each process uses GPU LOCAL_RANK) or None: NCCL when
    torch sees GPUs, else gloo. timeout: seconds (or a timedelta) a collective waits for the other
    ranks before failing; default: $BIASTRANSFER_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S. With NCCL,
    NCCL_ASYNC_ERROR_HANDLING=1 is set (unless set) so the timeout applies. env: the variables
    (default os.environ). Calling it again in an initialized process returns the same info.

    Raises ValueError naming the variable that is missing or invalid, TypeError for arguments of
    the wrong type, DistributedError if the rendezvous fails (e.g. a rank never arrives).
    """
    global _INFO
    if is_initialized():  # set up here before, or by the caller with torch.distributed itself
        return info()
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    rank_ = _env_int(env, "RANK", 0)
    if rank_ >= world:
        raise ValueError(f"environment variable RANK: expected 0..{world - 1} (WORLD_SIZE "
                         f"{world}), got {rank_}")
    address = env.get("MASTER_ADDR", "")
    if not address.strip():
        raise ValueError("environment variable MASTER_ADDR is not set; it names the machine of "
                         "rank 0 (e.g. 127.0.0.1 on one machine)")
    port = _env_int(env, "MASTER_PORT", 1, 65535)
    local_rank = _env_int(env, "LOCAL_RANK", 0) if env.get("LOCAL_RANK", "") != "" else rank_
    timeout_s = _timeout_seconds(timeout, env)
    backend = _check_backend(backend) if backend is not None else _default_backend()
    if backend == "nccl":
        os.environ.setdefault("NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank_,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:
        raise DistributedError(
            f"rank {rank_} of {world}: joining the process group at {address}:{port} "
            f"({backend}) failed: {error}. Are all {world} ranks started with the same "
            f"MASTER_ADDR/MASTER_PORT, and is the port reachable from every machine?") from error
    _INFO = DistInfo(rank_, world, local_rank, backend, address, port, timeout_s)
    return _INFO


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """This process's DistInfo. A process group the caller created with
    torch.distributed.init_process_group is adopted (timeout from $BIASTRANSFER_DIST_TIMEOUT or
    the default, for messages only). ValueError if torch.distributed is not initialized."""
    global _INFO
    if not is_initialized():
        _INFO = None
        raise ValueError("torch.distributed is not initialized here; call "
                         "biastransfer.distributed.init_from_env() first")
    if _INFO is None:
        env = os.environ
        port = env.get("MASTER_PORT", "")
        _INFO = DistInfo(dist.get_rank(), dist.get_world_size(),
                         int(env.get("LOCAL_RANK", "") or dist.get_rank()),
                         str(dist.get_backend()), env.get("MASTER_ADDR", ""),
                         int(port) if port.isdigit() else 0, _timeout_seconds(None, env))
    return _INFO


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0 (or not distributed): the rank that writes files and prints."""
    return rank() == 0


def _fail(what: str, error: BaseException) -> DistributedError:
    timeout = f"{_INFO.timeout_s:g} s" if _INFO is not None else "the process-group timeout"
    return DistributedError(
        f"rank {rank()} of {world_size()}: {what} failed: {error}. Another rank has probably "
        f"died or stopped (look at its output), or the connection between the machines was "
        f"lost; collectives wait at most {timeout} (timeout argument of init_from_env or "
        f"{TIMEOUT_ENV})")


def _collective_device() -> torch.device:
    if _INFO is not None and _INFO.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor], what: str = "all-reduce") -> None:
    """Sums each tensor element-wise across the ranks, in place (one all-reduce per tensor).
    Tensors off the backend's device (CPU tensors under NCCL) travel through a copy. ``what``
    names the operation in the DistributedError raised when a collective fails."""
    device = _collective_device()
    for tensor in tensors:
        moved = tensor if tensor.device == device else tensor.to(device)
        try:
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        except RuntimeError as error:
            raise _fail(what, error) from error
        if moved is not tensor:
            tensor.copy_(moved)


def barrier(what: str = "barrier") -> None:
    """Waits until every rank gets here (a no-op when not distributed)."""
    if not is_initialized():
        return
    # An all-reduce rather than dist.barrier(): it honours the timeout on every backend.
    all_reduce_sum([torch.zeros(1)], what)


def shutdown() -> None:
    """Leaves the process group (safe to call when not initialized)."""
    global _INFO
    if is_initialized():
        dist.destroy_process_group()
    _INFO = None


def shard_range(n: int, rank_: Optional[int] = None,
                world: Optional[int] = None) -> Tuple[int, int]:
    """The contiguous block [begin, end) of n items that rank ``rank_`` of ``world`` takes:
    begin = rank * n // world. Blocks are disjoint, cover 0..n-1 in order and differ in size by
    at most one."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"rank: expected 0..{world - 1}, got {rank_}")
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    return rank_ * n // world, (rank_ + 1) * n // world


# ---- training -----------------------------------------------------------------------------


class _StepTracker:
    """Follows the trainer's all-reduces (two at the start, one per step, one at the end) and
    its completed steps, to name the failing one in errors."""

    def __init__(self) -> None:
        self.reset(0, 0)

    def reset(self, step: int, total: int) -> None:
        self.step, self.total, self.calls = step, total, 0

    def describe(self) -> str:
        if self.calls <= 2:
            return "the trainer's start (step check and weight synchronization)"
        if self.step >= self.total:
            return f"the trainer's final barrier after step {self.step}"
        return f"the trainer's gradient all-reduce of step {self.step + 1} of {self.total}"


def data_parallel_hook(tracker: Optional[_StepTracker] = None
                       ) -> Callable[[List[torch.Tensor]], None]:
    """The all-reduce the C++ Trainer calls (TrainerConfig.set_data_parallel): sums its buffers
    across the ranks, naming the step in the DistributedError raised when a rank is gone."""

    def all_reduce(buffers: List[torch.Tensor]) -> None:
        what = "the trainer's all-reduce"
        if tracker is not None:
            tracker.calls += 1
            what = tracker.describe()
        all_reduce_sum(buffers, what)

    return all_reduce


def configure_trainer(native_config: Any, tracker: Optional[_StepTracker] = None) -> None:
    """Makes a native _C.TrainerConfig data parallel over the initialized process group."""
    current = info()
    native_config.set_data_parallel(current.rank, current.world_size,
                                    data_parallel_hook(tracker))


# ---- fingerprints -------------------------------------------------------------------------

# Accumulator state (FingerprintAccumulator.state()) summed across ranks; the rest is either
# per sequence (gathered) or fixed (subset).
_DENSE = ("sum_delta", "sum_delta_sq", "sum_grad", "sum_centered", "sum_kl_teacher_reference",
          "sum_kl_reference_teacher", "sum_mass_shift", "sum_mass_shift_sq")
_COUNTS = ("positions", "skipped_nonfinite")


def fingerprint_sharded(teacher: Any, reference: Any, data: Any, tokenizer: Any,
                        **kwargs: Any) -> Any:
    """:func:`biastransfer.fingerprint` over the records of ``data`` split across the ranks, with
    the same arguments; every rank returns the same FingerprintResult, equal to one process's
    over all records (float64 sums in another order: within 1e-12 relative).

    Rank r scores the contiguous block ``shard_range(len(records))`` with sequence ids = global
    record indices (+ ``sequence_offset``), so per-sequence tests see the same sequences as one
    process. ``data`` must be the same on every rank: a JSON lines path or a sequence of records
    (an iterable is read into a list). Only rank 0 shows a progress bar. Raises ValueError when
    there are fewer records than ranks.
    """
    from .data import read_jsonl
    from .fingerprint import fingerprint

    info()  # initialized?
    if isinstance(data, (str, os.PathLike)):
        records = read_jsonl(data)
    elif isinstance(data, Sequence):
        records = data
    elif isinstance(data, Iterable):
        records = list(data)
    else:
        raise TypeError(f"data: expected a JSON lines path or a sequence of records, got "
                        f"{type(data).__name__}")
    n, world = len(records), world_size()
    if n < world:
        raise ValueError(f"data: {n} records for {world} ranks; every rank needs at least one "
                         f"record (use fewer ranks)")
    begin, end = shard_range(n)
    offset = kwargs.pop("sequence_offset", 0)
    kwargs["progress"] = bool(kwargs.get("progress", True)) and is_main()
    local = fingerprint(teacher, reference, records[begin:end], tokenizer,
                        sequence_offset=offset + begin, **kwargs)
    return all_reduce_fingerprint(local)


def _header(result: Any, states: List[Dict[str, torch.Tensor]],
            packed_length: int) -> torch.Tensor:
    """Per rank: what must agree across ranks, then the sizes and counts to combine."""
    first = result.accumulators[0]
    subset = first.subset
    return torch.tensor([
        float(len(result.accumulators)), float(first.vocab_size), float(subset.numel()),
        float(subset.sum()) if subset.numel() else 0.0, float(first.temperature),
        float(packed_length), float(result.config.records),
        float(max(int(s["next_sequence_id"]) for s in states)),
    ], dtype=torch.float64)


def _pack_sequences(states: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """[n, ids..., counts..., sums (n x S)...] per accumulator, as one float64 vector (ids and
    counts are integers below 2^53, exact in float64)."""
    parts = []
    for s in states:
        ids = s["sequence_ids"]
        parts += [torch.tensor([float(ids.numel())], dtype=torch.float64), ids.double(),
                  s["sequence_counts"].double(), s["sequence_sum_centered"].reshape(-1)]
    return torch.cat(parts)


def _all_gather(tensor: torch.Tensor, what: str) -> List[torch.Tensor]:
    device = _collective_device()
    moved = tensor.to(device)
    out = [torch.empty_like(moved) for _ in range(world_size())]
    try:
        dist.all_gather(out, moved)
    except RuntimeError as error:
        raise _fail(what, error) from error
    return [t.cpu() for t in out]


def all_reduce_fingerprint(result: Any) -> Any:
    """Combines the FingerprintResult of every rank's shard into one, on every rank: float64 sums
    and counts are all-reduced (one all-reduce of O(V) values for all accumulators), per-sequence
    counts and centered sums are all-gathered (in rank order; each sequence id must come from one
    rank only). Equal to :meth:`FingerprintResult.merge` of all shards."""
    from .fingerprint import FingerprintResult
    from .safetensors import SafetensorsFile, save_safetensors

    info()
    states = [a.state() for a in result.accumulators]
    per_sequence = [a.per_sequence for a in result.accumulators]
    packed = _pack_sequences(states)
    headers = _all_gather(_header(result, states, packed.numel()), "fingerprint header exchange")
    mine = headers[rank()]
    for r, h in enumerate(headers):
        if not torch.equal(h[:5], mine[:5]):
            names = ("accumulators", "vocab_size", "subset size", "subset id sum", "temperature")
            bad = next(i for i in range(5) if h[i] != mine[i])
            raise ValueError(f"rank {r}'s fingerprint has {names[bad]} {h[bad].item():g}, rank "
                             f"{rank()}'s has {mine[bad].item():g}; every rank must run the same "
                             f"models, tokenizer, subset and options")
    # Sums: one flat float64 all-reduce for every accumulator.
    dense = torch.cat([s[k].double().reshape(-1) for s in states for k in _DENSE + _COUNTS])
    all_reduce_sum([dense], "fingerprint all-reduce")
    # Per-sequence sums: gathered, padded to the longest rank's.
    longest = int(max(h[5].item() for h in headers))
    padded = torch.zeros(longest, dtype=torch.float64)
    padded[: packed.numel()] = packed
    gathered = _all_gather(padded, "fingerprint per-sequence gather")
    next_id = int(max(h[7].item() for h in headers))
    records = int(sum(h[6].item() for h in headers))

    merged = []
    offset = 0
    cursors = [0] * len(gathered)
    with tempfile.TemporaryDirectory(prefix="biastransfer-dist-") as folder:
        for i, (acc, state) in enumerate(zip(result.accumulators, states)):
            width = state["subset"].numel()
            new: Dict[str, torch.Tensor] = {"subset": state["subset"]}
            for k in _DENSE + _COUNTS:
                n = state[k].numel()
                value = dense[offset: offset + n].reshape(state[k].shape)
                offset += n
                new[k] = value.round().long() if k in _COUNTS else value.clone()
            new["next_sequence_id"] = torch.tensor(next_id, dtype=torch.int64)
            ids, counts, sums, owner = [], [], [], {}
            for r, buffer in enumerate(gathered):
                c = cursors[r]
                m = int(buffer[c].item())
                rank_ids = buffer[c + 1: c + 1 + m].long()
                rank_counts = buffer[c + 1 + m: c + 1 + 2 * m].long()
                rows = m * width if per_sequence[i] else 0
                rank_sums = buffer[c + 1 + 2 * m: c + 1 + 2 * m + rows]
                cursors[r] = c + 1 + 2 * m + rows
                for sid in rank_ids.tolist():
                    if sid in owner:
                        raise ValueError(f"sequence id {sid} was scored on ranks {owner[sid]} "
                                         f"and {r}; shards must hold disjoint records")
                    owner[sid] = r
                ids.append(rank_ids)
                counts.append(rank_counts)
                sums.append(rank_sums.reshape(-1, width) if per_sequence[i]
                            else torch.zeros(0, width, dtype=torch.float64))
            new["sequence_ids"] = torch.cat(ids)
            new["sequence_counts"] = torch.cat(counts)
            new["sequence_sum_centered"] = torch.cat(sums, 0)
            # The accumulator file format (validated by FingerprintAccumulator.load) is the way
            # to give an accumulator a state: this rank's own file provides the metadata.
            local_path = os.path.join(folder, f"local{i}.safetensors")
            acc.save(local_path)
            with SafetensorsFile(local_path) as file:
                metadata = dict(file.metadata)
            metadata["positions"] = str(int(new["positions"].item()))
            path = os.path.join(folder, f"merged{i}.safetensors")
            save_safetensors(path, new, metadata)
            merged.append(_C.FingerprintAccumulator.load(path)[0])
    config = replace(result.config, records=records)
    return FingerprintResult.from_accumulators(
        merged[0], merged[1:], result.tokenizer, config=config,
        metadata={**result.metadata, "config": _config_json(config)})


def _config_json(config: Any) -> str:
    import json
    from dataclasses import asdict

    return json.dumps(asdict(config))

"""The fine-tuning collector, chosen by ``collect.*`` (``app.finetune_config.CollectConfig``):

- ``workers=0``: torchrl ``Collector`` in the learner's process; collection and updates alternate.
- ``workers=n``, ``backend=local``: n worker processes of this machine. ``sync=false``:
  ``MultiAsyncCollector``, each batch is one worker's while the others keep collecting during the updates
  (their weights at most one batch old). ``sync=true``: ``MultiSyncCollector``, each batch stacks one
  sub-batch per worker, all collected with the weights of the last update (the workers wait meanwhile).
- ``workers=n``, ``backend=distributed``: TorchRL's ``DistributedCollector`` (torch.distributed, gloo over
  TCP), n collector processes launched by ``launcher`` ("mp": on this machine, over loopback;
  "submitit": one SLURM job each); ``sync`` as above, but async only overlaps n - 1 workers with the
  updates (the one whose batch came is told to go on when the learner asks for the next batch).

Every worker builds its env with ``env_fn(worker_index)`` (its own seed stream) and one ``collect.num_envs``
batch of sub-envs. Weights go to the workers in ``update_policy_weights_()``, after the updates of a batch
(local workers act on the learner's very weight tensors, which TorchRL puts in shared memory, so async ones
may read them mid-update; distributed workers hold copies, which only that call updates).
The replay buffer stays the learner's: batches come back to it over pipes, shared memory or TCP and it extends
its own buffer (no remote buffer: a worker never samples, so the data crosses the wire once either way).

A dead worker never hangs the learner: its death raises a RuntimeError within seconds (on the wait for its
data or for its acknowledgement of new weights) and ``dead_workers`` names it; the learner's state is whole.
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import queue
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import torch
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector, MultiAsyncCollector, MultiSyncCollector
from torchrl.collectors.distributed import DistributedCollector
from torchrl.weight_update import DistributedWeightSyncScheme, SharedMemWeightSyncScheme

from app.envs.torchrl_envs import ChunkEnv
from app.finetune_config import CollectConfig

AnyCollector = Collector | MultiAsyncCollector | MultiSyncCollector | DistributedCollector
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT")
ENDLESS = 2**62  # the distributed collectors stop at total_frames and read -1 as "none at all"


class WatchedWeightSync(SharedMemWeightSyncScheme):
    """TorchRL's shared-memory weight sync, whose wait for a worker's acknowledgement ends when that worker
    dies (TorchRL's own waits forever, so ``update_policy_weights_`` would hang on a dead worker)."""

    procs: list = []  # the collector's worker processes, set once they run (a Process does not pickle)

    def _wait_for_ack(self, worker_ids: int | list[int] | None = None, timeout: float | None = None) -> None:
        ids = [worker_ids] if isinstance(worker_ids, int) else worker_ids or list(self._ack_queues)
        for i in ids:
            while True:
                try:
                    self._ack_queues[i].get(timeout=1.0)
                    break
                except queue.Empty:
                    if self.procs[i].exitcode is not None:
                        raise RuntimeError(f"collector worker {i} died while receiving weights") from None


class DistributedSync(DistributedWeightSyncScheme):
    """TorchRL's torch.distributed weight sync, whose receiving thread in a worker stops at once on shutdown
    (TorchRL's waits in a blocking store read, so every worker took 5 s more to end)."""

    def shutdown(self) -> None:
        thread = getattr(self, "_background_thread", None)
        if getattr(self, "_worker_idx", None) is not None and thread is not None and thread.is_alive():
            try:  # what the thread waits for, on a connection of its own (the thread's is busy waiting)
                store = self._make_store(is_master=False, store_info=self._store_info)
                store.set(f"NODE_{self._worker_idx}_in", b"stop")
            except RuntimeError:  # the learner's store is gone already
                pass
        super().shutdown()


class _WatchedStore:
    """The learner's TCPStore of a ``WatchedDistributedCollector``: reading a worker's status raises once that
    worker's process has ended (TorchRL's async loop polls those statuses, forever if every worker died). A
    read that timed out on a dead worker is named by the collector's iterator."""

    def __init__(self, store, procs: Callable[[], list]) -> None:
        self._store, self._procs = store, procs

    def get(self, key: str) -> bytes:
        if key.startswith("NODE_") and key.endswith("_status"):
            rank, procs = int(key.split("_")[1]), self._procs()
            if 0 < rank <= len(procs) and procs[rank - 1].exitcode is not None:
                raise RuntimeError(f"collector worker {rank - 1} died")
        return self._store.get(key)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class WatchedDistributedCollector(DistributedCollector):
    """``DistributedCollector`` that neither hangs on nor skips a dead worker: with launcher "mp", a worker
    process that ended raises a RuntimeError at the learner's next look at it, and shutdown does not wait for
    its answer (TorchRL waits 10 s, then raises). SLURM jobs (submitit) are not watched: their deaths surface
    as gloo's "Connection closed by peer" on the next exchange with them."""

    def __init__(self, *args, **kwargs) -> None:
        self._saved_env = {k: os.environ.get(k) for k in _DIST_ENV}  # TorchRL sets them for its workers
        super().__init__(*args, **kwargs)

    @property
    def procs(self) -> list:
        """The worker processes (launcher "mp"; none for SLURM jobs)."""
        return [job for job in getattr(self, "jobs", []) if hasattr(job, "exitcode")]

    def iterator(self):
        """TorchRL's iterator; an exchange that failed because a worker died (gloo: "Connection closed by
        peer", the store: "wait timeout") raises naming that worker."""
        try:
            yield from super().iterator()
        except RuntimeError as err:
            if "collector worker" in str(err):
                raise
            for proc in self.procs:
                proc.join(2.0 if proc.exitcode is None else 0)  # an exit code may lag behind the end
            if dead := [i for i, proc in enumerate(self.procs) if proc.exitcode]:
                raise RuntimeError(f"collector worker {dead[0]} died: {err}") from err
            raise

    def _init_master_dist(self, world_size, backend) -> None:
        super()._init_master_dist(world_size, backend)
        self._store = _WatchedStore(self._store, lambda: self.procs)

    def shutdown(self, timeout: float | None = None) -> None:
        if not getattr(self, "_shutdown", False) and hasattr(self, "_store"):
            for rank, proc in enumerate(self.procs, start=1):
                if proc.exitcode is not None:  # it cannot answer TorchRL's wait for 'down': answer for it
                    self._store.set(f"NODE_{rank}_out", b"down")
        try:
            super().shutdown(timeout)
        finally:  # a later torch.distributed user of this process (Lightning's DDP) must not read them
            for key, value in getattr(self, "_saved_env", {}).items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def dead_workers(collector: AnyCollector) -> list[str]:
    """'collector worker i (pid N) died (exit code C)' for each worker process that ended."""
    out = []
    for i, proc in enumerate(getattr(collector, "procs", [])):
        try:
            code = proc.exitcode
        except ValueError:  # closed: TorchRL terminated it after another one died
            continue
        if code:  # not None (running) nor 0 (a clean exit, told to by the learner's shutdown)
            out.append(f"collector worker {i} (pid {proc.pid}) died (exit code {code})")
    return out


def free_port() -> int:
    """A TCP port nobody listens on now, with the next two free too (TorchRL uses port, port+1, port+2)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port + 2 < 65536 and all(_is_free(port + k) for k in (1, 2)):
            return port
    raise RuntimeError("no free TCP port for collect.backend=distributed; set collect.tcp_port")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _child_env(env_fn: Callable, index: int) -> ChunkEnv:
    """``env_fn(index)``, in a worker process of this machine with one torch thread (not the learner)."""
    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)
    return env_fn(index)


def _policy_copy(blob: bytes) -> TensorDictModule:
    """A worker's own copy of the policy, from ``torch.save`` bytes."""
    return torch.load(io.BytesIO(blob), weights_only=False)


@contextlib.contextmanager
def workers_ignore_sigint() -> Iterator[None]:
    """Processes started inside this block ignore SIGINT (inherited across fork and exec, and Python keeps an
    ignored SIGINT ignored). Ctrl-C in a terminal reaches the whole foreground group: the workers must not die
    of it mid-exchange, since the learner's handler stops at the end of a batch, saves and shuts them down."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def make_collector(
    env: ChunkEnv,
    policy: TensorDictModule,
    cfg: CollectConfig,
    warmup: bool = True,
    env_fn: Callable | None = None,
) -> AnyCollector:
    """In-process ``Collector`` on ``env`` (workers=0), else the collector of ``cfg.backend`` and ``cfg.sync``
    over ``cfg.workers`` processes that each build their env with ``env_fn(worker_index)``."""
    per_worker = cfg.num_envs * cfg.chunks_per_batch
    # "actor": the warm-up chunks come from the initial actor itself (no updates until warmup_chunks)
    random_frames = cfg.warmup_chunks if warmup and cfg.warmup_actions == "uniform" else 0
    kw = dict(init_random_frames=random_frames, auto_register_policy_transforms=False)  # a stateless actor
    if cfg.workers == 0:
        return Collector(env, policy, frames_per_batch=per_worker, total_frames=-1, **kw)
    if env_fn is None:
        raise ValueError(f"collect.workers={cfg.workers} needs env_fn, a picklable env factory")
    frames = per_worker * cfg.workers if cfg.sync else per_worker  # a sync batch gathers every worker's
    if cfg.backend == "distributed":
        return make_distributed(policy, cfg, env_fn, frames, random_frames)
    envs = [functools.partial(env_fn, i) for i in range(cfg.workers)]
    sync = WatchedWeightSync()
    cls, extra = (MultiSyncCollector, dict(cat_results="stack")) if cfg.sync else (MultiAsyncCollector, {})
    # the learner keeps its thread count (cfg.threads); each worker runs one thread (num_sub_threads=1)
    with workers_ignore_sigint():
        collector = cls(
            envs, policy, frames_per_batch=frames, total_frames=-1, num_threads=torch.get_num_threads(),
            num_sub_threads=1, weight_sync_schemes={"policy": sync}, **extra, **kw,
        )  # fmt: skip
    sync.procs = collector.procs
    return collector


def make_distributed(
    policy: TensorDictModule, cfg: CollectConfig, env_fn: Callable, frames: int, random_frames: int
) -> WatchedDistributedCollector:
    """TorchRL's torch.distributed collector: ``cfg.workers`` single-env collector processes (ranks 1..n,
    the learner is rank 0) over gloo on ``cfg.tcp_port`` (0: a free one) and the two ports after it."""
    threads = torch.get_num_threads()
    # the workers get the policy as bytes: passed as a module, torch.multiprocessing would share the learner's
    # very tensors with "mp" workers, which then read weights mid-update and never need the weight sync
    blob = io.BytesIO()
    torch.save(policy, blob)
    with workers_ignore_sigint():
        collector = _distributed(policy, cfg, env_fn, frames, random_frames, blob.getvalue())
    torch.set_num_threads(threads)  # the learner built a worker's env too (TorchRL's shape probe)
    return collector


def _distributed(policy, cfg: CollectConfig, env_fn: Callable, frames: int, random_frames: int, blob: bytes):
    slurm = dict(slurm_partition=cfg.slurm_partition, slurm_cpus_per_task=cfg.slurm_cpus_per_task)
    slurm |= dict(timeout_min=cfg.slurm_timeout_min)  # TorchRL's default, 10 min, would end a long run
    return WatchedDistributedCollector(
        [functools.partial(_child_env, env_fn, i) for i in range(cfg.workers)],
        policy,  # the weights' source
        policy_factory=functools.partial(_policy_copy, blob),
        frames_per_batch=frames,
        total_frames=ENDLESS,
        init_random_frames=random_frames,
        sync=cfg.sync,
        launcher=cfg.launcher,
        tcp_port=cfg.tcp_port or free_port(),
        slurm_kwargs=slurm,
        collector_kwargs=dict(auto_register_policy_transforms=False),
        weight_sync_schemes={"policy": DistributedSync(backend="gloo", sync=cfg.sync)},
    )

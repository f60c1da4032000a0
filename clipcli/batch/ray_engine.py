"""``clipcli batch --engine ray``: the embedding step of a batch run on Ray Data.

Only the embedding moves to Ray; everything else stays with the driver (the process that runs
``clipcli batch``) and is the local engine's code: :class:`~clipcli.batch.runner.BatchRunner`
lists the sources, takes the lock, decides what is pending (resume, incremental, the settings
guard), commits a shard every ``--shard-size`` rows as results stream back, and consolidates.
This module turns the pending items into a Ray Data pipeline and yields the same
``list[Embedded | Failed]`` batches that :func:`clipcli.pipeline.embed_images` yields:

images
    ``from_items(sources)`` -> :func:`load_images` in ``map_batches`` on CPU tasks
    (:class:`~clipcli.pipeline.ImageLoader` + :meth:`Encoder.preprocess_image`, the encoder built
    once per worker process without model weights) -> :class:`EncodeImages`, a callable class on
    an actor pool (``ActorPoolStrategy``; GPU actors when the cluster has GPUs) that loads the
    model once and runs :meth:`Encoder.encode_pixels`;
texts
    ``from_items(texts)`` -> :class:`EncodeTexts` on the actor pool, which runs
    :func:`clipcli.pipeline.embed_texts` (tokenize, length-sorted batches, encode_token_ids).

An input that fails to load travels on as a row with its stage and reason and comes back as a
:class:`~clipcli.pipeline.Failed`; it never fails the job. Ray is imported only here and only
when the engine runs: the base install never needs it.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.batch.ray_workers import EncodeImages, EncodeTexts, load_images
from clipcli.errors import ClipcliError, ModelError, UsageError, first_line
from clipcli.pipeline import Embedded, Failed

if TYPE_CHECKING:
    from clipcli.batch.plan import Item
    from clipcli.encoder import Encoder
    from clipcli.pipeline import ImageLoader, Result

INSTALL_HINT = "pip install 'clipcli[ray]'"
LOAD_TASK_MEMORY = 256 * 1024 * 1024  # bytes of Ray "memory" resource per loading task
TEXT_WINDOW_BATCHES = 8  # as embed_texts: length-sorted batches within windows of 8 batches
MAX_BLOCKS = 4096


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or a UsageError (exit 2) saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part we need ("ray[data]")
    except ImportError as exc:
        raise UsageError(
            f"--engine ray needs Ray Data, which is not installed here ({exc}): {INSTALL_HINT} "
            "(or pip install 'ray[data]'), or use --engine local"
        ) from None
    return ray


@dataclass
class RayOptions:
    """How the Ray engine runs.

    ``address``: None starts a local Ray for the run (or joins ``$RAY_ADDRESS``); ``auto`` joins
    the cluster running on this machine; ``HOST:PORT`` or ``ray://HOST:PORT`` joins that one.
    When the calling process has already called ``ray.init`` that session is used as it is.
    ``workers``: encoder actors (0: one per ``num_gpus_per_worker`` GPUs, or half the CPUs on a
    cluster without GPUs). ``num_gpus_per_worker``: None is 1 when the cluster has GPUs, else 0.
    ``encoder_factory`` / ``loader_factory``: what workers call to build their Encoder and
    ImageLoader (serialised with cloudpickle); ``encoder_factory`` defaults to the runner's.
    ``init_kwargs``: extra ``ray.init`` arguments when this engine starts Ray.
    """

    address: str | None = None
    workers: int = 0
    num_gpus_per_worker: float | None = None
    encoder_factory: Callable[[], Encoder] | None = None
    loader_factory: Callable[[], ImageLoader] | None = None
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    progress_bars: bool = False


class RayEngine:
    """The embedding step on Ray Data; see the module docstring. One engine serves one run."""

    name = "ray"

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        if self.options.workers < 0:
            raise UsageError("--workers must be 0 (automatic) or more")
        gpus = self.options.num_gpus_per_worker
        if gpus is not None and (gpus < 0 or not math.isfinite(gpus)):
            raise UsageError("--num-gpus-per-worker must be 0 or more")
        self.info: dict[str, Any] = {}  # filled as the run goes: device, workers, cluster
        self._ray: Any = None
        self._started = False
        self._resources: tuple[int, float] | None = None
        self._stderr_filter: Any = None  # first-hour (#17): Ray's native log lines off stderr

    # ------------------------------------------------------------------ session
    def start(self, modality: str) -> None:
        """Join or start Ray and size the actor pool (UsageError when the cluster cannot fit it)."""
        ray = self._connect()
        self._resources = self._plan_resources(ray, modality)

    def _connect(self) -> Any:
        ray = require_ray()
        self._ray = ray
        if ray.is_initialized():
            return ray
        # Ray's own notices only with -v (progress_bars): clipcli reports progress and failures.
        level = logging.WARNING if self.options.progress_bars else logging.ERROR
        kwargs: dict[str, Any] = {"logging_level": level, "configure_logging": True}
        # --- first-hour (#17): Ray's C++ lines (core_worker.cc ...) and its workers' logs stay
        # off stderr unless -v; failures still reach the user as clipcli's own messages.
        if not self.options.progress_bars:
            from clipcli.native_stderr import NativeStderrFilter

            kwargs["log_to_driver"] = False
            self._stderr_filter = NativeStderrFilter()
        # --- end first-hour
        if self.options.address:
            kwargs["address"] = self.options.address
        else:
            kwargs["include_dashboard"] = False  # a batch job needs no web server
        kwargs.update(self.options.init_kwargs)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"at {self.options.address}" if self.options.address else "(local start)"
            self._close_stderr_filter()  # first-hour (#17)
            raise UsageError(f"cannot start or reach a Ray cluster {where}: {first_line(exc)}") from None
        finally:
            # ray.init makes SIGTERM exit at once; keep clipcli's (stop cleanly, commit the rows).
            if main and previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self._started = True
        return ray

    def close(self) -> None:
        """Shut down the Ray session this engine started (a joined or caller's one is left)."""
        self._resources = None
        if self._started and self._ray is not None:
            self._started = False
            _wait_for_executors()
            try:
                self._ray.shutdown()
            except Exception:  # shutting down after a failure: nothing more to save
                pass
        self._close_stderr_filter()  # first-hour (#17)

    # --- first-hour (#17)
    def _close_stderr_filter(self) -> None:
        """stderr as it was before this engine started Ray (see clipcli.native_stderr)."""
        stderr_filter, self._stderr_filter = self._stderr_filter, None
        if stderr_filter is not None:
            stderr_filter.close()
    # --- end first-hour

    def _plan_resources(self, ray: Any, modality: str) -> tuple[int, float]:
        """(actors, GPUs per actor), checked against what the cluster has."""
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 0))
        gpus = float(resources.get("GPU", 0))
        per = self.options.num_gpus_per_worker
        if per is None:
            per = 1.0 if gpus >= 1 else 0.0
        if per > 0 and gpus < per:
            raise UsageError(
                f"--num-gpus-per-worker {per:g} asks for GPUs but the Ray cluster has {gpus:g}; "
                "use --num-gpus-per-worker 0 to encode on CPUs"
            )
        workers = self.options.workers
        # Each actor holds one CPU; image loading needs at least one more.
        spare = 1 if modality == "image" else 0
        if workers == 0:
            workers = int(gpus // per) if per > 0 else int(cpus // 2)
            workers = max(1, min(workers, int(cpus) - spare))
        if per > 0 and workers * per > gpus + 1e-9:
            raise UsageError(f"--workers {workers} x --num-gpus-per-worker {per:g} needs {workers * per:g} GPUs; the Ray cluster has {gpus:g}")
        if workers + spare > cpus:
            need = f"{workers} encoder actor(s)" + (" plus one CPU for loading images" if spare else "")
            raise UsageError(f"--workers {workers}: {need} need {workers + spare} CPUs; the Ray cluster has {cpus:g}")
        self.info.update({"workers": workers, "num_gpus_per_worker": per, "cluster_cpus": cpus, "cluster_gpus": gpus})
        return workers, per

    # ------------------------------------------------------------------ running
    def embed(
        self,
        items: Sequence[Item],
        *,
        modality: str,
        encoder_factory: Callable[[], Encoder],
        batch_size: int,
        on_truncated: Callable[[str], Any] | None = None,
    ) -> Iterator[list[Result]]:
        """Embed ``items`` on Ray; yield results batch by batch as they come back (any order)."""
        if self._resources is None:
            self.start(modality)
        assert self._resources is not None
        ray = self._ray
        from ray.data import ActorPoolStrategy, DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = self.options.progress_bars
        context.print_on_execution_start = self.options.progress_bars
        if not self.options.progress_bars:
            # clipcli reports progress itself; Ray Data's notices would interleave with it.
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        workers, gpus = self._resources
        factory = self.options.encoder_factory or encoder_factory
        compute = ActorPoolStrategy(size=workers)
        actor_args: dict[str, Any] = {"compute": compute, "num_cpus": 1, "batch_format": "numpy"}
        if gpus > 0:
            actor_args["num_gpus"] = gpus
        if modality == "image":
            rows = [{"source": item.source} for item in items]
            ds = _from_items(ray, rows, _blocks(len(rows), batch_size))
            ds = ds.map_batches(
                load_images,
                fn_kwargs={"encoder_factory": factory, "loader_factory": self.options.loader_factory, "token": uuid.uuid4().hex},
                batch_size=batch_size, batch_format="numpy", num_cpus=1,
                # A memory reservation for the decoded images a task holds. It also keeps Ray Data
                # from fusing this step into the actors (it fuses only steps with equal resource
                # requests): loading stays in CPU tasks of its own, next to the encoding actors.
                memory=LOAD_TASK_MEMORY,
            )
            ds = ds.map_batches(EncodeImages, fn_constructor_kwargs={"encoder_factory": factory}, batch_size=batch_size, **actor_args)
        else:
            rows = [{"source": item.source, "text": item.text or ""} for item in items]
            window = batch_size * TEXT_WINDOW_BATCHES
            ds = _from_items(ray, rows, _blocks(len(rows), window))
            ds = ds.map_batches(
                EncodeTexts, fn_constructor_kwargs={"encoder_factory": factory, "batch_size": batch_size},
                batch_size=window, **actor_args,
            )
        seen: set[str] = set()
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for batch in batches:
                yield self._results(batch, seen, on_truncated)
        except ClipcliError:
            raise
        except Exception as exc:
            raise _as_clipcli_error(exc) from exc
        finally:
            # Stop Ray Data's executor now (its generator's cleanup), not when garbage collected:
            # it must be gone before close() shuts Ray down (see _wait_for_executors).
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def _results(self, batch: dict[str, np.ndarray], seen: set[str], on_truncated: Callable[[str], Any] | None) -> list[Result]:
        out: list[Result] = []
        sources = batch["source"]
        if len(sources) and "device" not in self.info:
            self.info["device"] = str(batch["device"][0])
            self.info["model_dtype"] = str(batch["model_dtype"][0])
        for i, source in enumerate(sources):
            source = str(source)
            if source in seen:  # a retried task may deliver a row twice: keep the first
                continue
            seen.add(source)
            reason = str(batch["reason"][i])
            if reason:
                out.append(Failed(source, str(batch["stage"][i]), reason))
                continue
            if on_truncated is not None and "truncated" in batch and bool(batch["truncated"][i]):
                on_truncated(source)
            out.append(Embedded(source, np.asarray(batch["vector"][i], dtype=np.float32)))
        return out


def _from_items(ray: Any, rows: list[dict[str, Any]], blocks: int) -> Any:
    try:
        return ray.data.from_items(rows, override_num_blocks=blocks)
    except TypeError:  # Ray < 2.10 named it parallelism
        return ray.data.from_items(rows, parallelism=blocks)


def _blocks(n: int, rows_per_block: int) -> int:
    return max(1, min(MAX_BLOCKS, math.ceil(n / max(1, rows_per_block))))


def _as_clipcli_error(exc: BaseException) -> ClipcliError:
    """A Ray failure as one clipcli error: the clipcli error a worker raised, if any.

    Ray Data hands the driver a ``RayTaskError`` whose text holds the worker's traceback (the
    original exception object does not survive), so the worker's error is found in that text.
    """
    from clipcli import errors

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClipcliError):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)
    text = _ANSI.sub("", str(exc))
    found = re.findall(r"clipcli\.errors\.(\w+): ([^\n]+)", text)
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, ClipcliError) and cls is not errors.InputError:
            return cls(message.strip())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b[^:]*:", line)]
    detail = raised[-1] if raised else (lines[0] if lines else type(exc).__name__)
    return ModelError(f"the Ray run failed: {detail}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _wait_for_executors(timeout: float = 10.0) -> None:
    """Wait (bounded) for Ray Data's executor threads to end before ``ray.shutdown()``.

    A thread of theirs that touches Ray after the shutdown makes Ray's core worker end the
    whole process with exit status 1 ("The core worker has already been shutdown"): after a
    Ctrl-C that turned clipcli's 130 into 1 in one CI run.
    """
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith("StreamingExecutor-"):
            shutdown = getattr(thread, "shutdown", None)  # a no-op for an executor already shut down
            if shutdown is not None:
                try:
                    shutdown(force=True)
                except Exception:  # best effort: Ray's internals vary between releases
                    pass
            thread.join(max(0.0, deadline - time.monotonic()))

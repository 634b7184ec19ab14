"""Where the embarrassingly parallel jobs run: this machine's worker processes (`local`) or a Ray cluster (`ray`).

The World Models pipeline has three such jobs, each a list of independent episodes whose result depends only on its
task (seeds included): rollout collection (`worlds.collect`), real-env episodes of controllers (the final evaluation,
the real checks and playoffs of CMA-ES, `--fitness real`: `agents.evaluate.RealEvaluator`). With `local` they run in
the process pools of those modules, as before; with `ray` they run as Ray tasks:

    Backend("ray")                        an embedded Ray instance, started and stopped by dreamlab, its temp dir
                                          (sockets, logs, spilled objects) in `temp_dir`, no dashboard
    Backend("ray", address="auto")        the Ray cluster this machine belongs to (`ray start --head` / `--address`)
    Backend("ray", address="HOST:6379")   an existing cluster by its head's address

Ray is optional (`pip install 'dreamlab[scale]'`) and imported only here, inside functions. A task lost with its worker
or node is re-run by Ray (`max_retries`); exceptions raised by the task itself come back to the caller, who decides.
Results travel back to the driver (the process that runs dreamlab), which alone writes the run folder: the nodes
need dreamlab installed, not the run folder.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamlab.errors import DreamlabError

BACKENDS = ("local", "ray")
RAY_PIP = "pip install 'dreamlab[scale]'  (or: pip install ray)"
TASK_RETRIES = 8       # times Ray re-runs a task whose worker or node died (the local collector's MAX_RESTARTS)
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch of cluster mode (off: a node on loopback only)
_SOCKET_ROOM = 70      # characters Ray appends to its temp dir for a socket path (AF_UNIX paths: at most 107)


@dataclass(frozen=True)
class Backend:
    """Where parallel episodes run. `address`: "" = an embedded instance (ray only), "auto" or HOST:PORT = a cluster;
    `temp_dir`: the embedded instance's temp dir (dreamlab's commands put it in the run folder, RUN/ray)."""

    kind: str = "local"
    address: str = ""
    temp_dir: str = ""

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise DreamlabError(f"backend={self.kind!r} is unknown; choose one of {', '.join(BACKENDS)}")
        if self.address and self.kind != "ray":
            raise DreamlabError(f"ray_address={self.address!r} is given but backend={self.kind!r}; add --backend ray "
                                "(or drop --ray-address)")
        a = self.address
        if a and a != "auto" and not a.startswith("ray://") and not _host_port(a):
            raise DreamlabError(f"ray_address={a!r} is not 'auto' or HOST:PORT (e.g. 10.0.0.1:6379); leave it empty "
                                "for an embedded instance")

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"


def _host_port(a: str) -> bool:
    host, sep, port = a.rpartition(":")
    return bool(sep and host and port.isdigit())


def import_ray() -> Any:
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise DreamlabError(f"--backend ray needs Ray, which is not installed; install it with: {RAY_PIP}") from e
    return ray


def _short_temp_dir(temp_dir: Path, stack: contextlib.ExitStack) -> str:
    """`temp_dir`, or a short symlink to it: Ray puts its sockets under the temp dir and AF_UNIX socket paths are
    limited to 107 bytes, which a run folder deep in a home directory exceeds."""
    temp_dir.mkdir(parents=True, exist_ok=True)  # earlier sessions stay (another command may be using one)
    path = str(temp_dir.resolve())
    if len(path) + _SOCKET_ROOM <= 107:
        return path
    link = Path(tempfile.mkdtemp(prefix="dlray-")) / "t"
    link.symlink_to(path, target_is_directory=True)
    stack.callback(shutil.rmtree, link.parent, True)
    return str(link)


@contextlib.contextmanager
def _loopback_only(ray: Any) -> Iterator[None]:
    """An embedded instance on 127.0.0.1 only. Ray gives a new local instance the host's network address (so that other
    nodes could join it) unless cluster mode is off, as it is on macOS and Windows: turned off here, for this process
    (Ray reads the flag when it picks the address) and for the processes Ray starts (the environment variable)."""
    from ray._private import ray_constants

    env, flag = os.environ.get(_CLUSTER_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = env


@contextlib.contextmanager
def ray_session(backend: Backend, num_cpus: int) -> Iterator[Any]:
    """Ray, ready to take tasks: connected to `backend.address`, or an embedded instance with `num_cpus` CPUs started
    here and stopped on exit. A Ray already initialised in this process (a notebook, a test fixture) is used as it
    is and left running."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    with contextlib.ExitStack() as stack:
        kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False,
                              "configure_logging": True}
        if backend.address:
            try:
                ray.init(address=backend.address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise DreamlabError(f"cannot connect to the Ray cluster at --ray-address {backend.address} ({e}); "
                                    "start it with `ray start --head` (and `ray start --address=HEAD:6379` on the "
                                    "workers), or leave --ray-address empty for an embedded instance") from e
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # on loopback, ours alone: no token file in ~/.ray
            stack.enter_context(_loopback_only(ray))
            if backend.temp_dir:
                kw["_temp_dir"] = _short_temp_dir(Path(backend.temp_dir), stack)
            ray.init(address="local", num_cpus=max(1, num_cpus), **kw)
        stack.callback(ray.shutdown)
        yield ray


def cluster_cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def describe(ray: Any, backend: Backend) -> str:
    """One line saying where the tasks go, e.g. `ray: 2 CPUs on 1 node (embedded; temp dir RUN/ray)`."""
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    where = f"cluster at {backend.address}" if backend.address else "embedded"
    if not backend.address and backend.temp_dir:
        where += f"; temp dir {backend.temp_dir}"
    return f"ray: {cluster_cpus(ray)} CPUs on {nodes} node{'s' if nodes != 1 else ''} ({where})"


def remote(fn: Callable[..., Any], **options: Any) -> Any:
    """`fn` as a Ray remote function taking one CPU, re-run by Ray when its worker or node dies."""
    ray = import_ray()
    return ray.remote(num_cpus=1, max_retries=TASK_RETRIES, **options)(fn)


@dataclass
class Failed:
    """A task that raised: `error` is the task's own exception (unwrapped from Ray's), `lost` says its worker or node
    died more often than Ray retries."""

    error: BaseException
    lost: bool = False

    def message(self) -> str:
        return f"{type(self.error).__name__}: {self.error}".splitlines()[0]


def ray_unordered(fn: Any, todo: deque[tuple[Any, tuple[Any, ...]]], in_flight: int, poll: float = 0.5
                  ) -> Iterator[tuple[Any, Any]]:
    """Run `fn.remote(*args)` for each `(key, args)` taken from `todo` (the caller may append to it meanwhile: a retry),
    at most `in_flight` at once. Yields `(key, result)` as tasks finish, in any order (result: the task's return value,
    or `Failed`), in batches: every task finished by now, then `(None, None)`; `(None, None)` also after `poll` seconds
    with nothing finished. So `(None, None)` is the moment to write what the batch changed and to refresh a progress
    bar: on a large cluster many tasks finish while the caller writes, and the next batch takes them all at once.
    Tasks still running when the caller stops are cancelled."""
    ray = import_ray()
    from ray.exceptions import RayTaskError

    running: dict[Any, Any] = {}  # ObjectRef -> key

    def refill() -> None:
        while todo and len(running) < in_flight:
            key, args = todo.popleft()
            running[fn.remote(*args)] = key

    try:
        while todo or running:
            refill()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=poll)
            if ready and len(running) > 1:  # and every other one finished by now
                ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
            done = [(running.pop(ref), ref) for ref in ready]
            refill()  # the freed workers get their next tasks before the caller spends time on these results
            for key, ref in done:
                try:
                    value = ray.get(ref)
                except RayTaskError as e:  # the task's own exception
                    cause = getattr(e, "cause", None)
                    value = Failed(cause if isinstance(cause, BaseException) else e)
                except ray.exceptions.RayError as e:  # worker or node lost more often than Ray retries, ...
                    value = Failed(e, lost=True)
                yield key, value
            yield None, None
    finally:
        for ref in running:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)

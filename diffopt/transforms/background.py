"""Compile in another process while the model runs uncompiled here (``background_compile``; on CUDA by default).

A whole UNet's first compiled call takes a minute or more (SD1.5 on an H200: 41-75 s, most of it inductor's code
generation), and without this the user waits that long for the first image. Here the calls run the model's eager
forward at once, while a child process builds the same model from its config (with weights of no value: compiled
code does not depend on weight values), applies the same diffopt changes, and compiles it with the same options for
the same input shapes. What it compiles lands in the caches this process reads (diffopt's compile cache entry, and
torch's own on-disk caches). Compiling from those caches still takes seconds here (dynamo traces the model again;
SD1.5 on an H200: 10-13 s), so a thread of this process does it, with inputs of the same shapes, while the calls go
on uncompiled; the first call after the thread is done runs compiled. Where optimize found a saved compile, that
thread loads it after the first call, with no child. A call with new input shapes runs uncompiled too while a child
compiles every shape seen so far, in the order they came, so that dynamo here and there make the same choices
(the second batch size of a model makes its batch dimension dynamic).

The child must produce the very graphs this process will trace, or the compile here finds nothing cached and takes
its full time (correct, only slow). So it checks what it built against a description of this model taken at the
first call (parameter and buffer names, shapes, dtypes and strides; attention processors; replaced forwards) and
stops with the first difference, and it runs with this process's inductor and dynamo settings. A child that fails
costs a warning, and the model compiles here as it would have without this option.

The child is ``python -m diffopt.transforms.background_child SPEC`` (background_child.py); it lowers its CPU
priority so the uncompiled calls here keep their core.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from ..components import execution_device
from .background_spec import Undescribable, compile_settings, describe_call, floats_select_graphs, make_call, structure

logger = logging.getLogger(__name__)

#: The optimize options that change the model itself, which the child applies again to its copy.
MODEL_OPTIONS = ("attention", "memory_format", "fuse_projections")
#: How long the first image takes without this option, as the notices say it.
FOREGROUND = "a minute or more for a full-size model"


class Child:
    """One running child process and what it compiles."""

    def __init__(self, spec: Dict[str, Any], signatures: List[Tuple]):
        self.signatures = list(signatures)
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="diffopt-compile-"))
        (self.directory / "spec.pkl").write_bytes(pickle.dumps({**spec, "signatures": self.signatures}))
        self.log_path = self.directory / "log.txt"
        package_root = str(pathlib.Path(__file__).resolve().parents[2])
        # The child must import this diffopt (a notebook may have put it on sys.path by hand) and the model's package.
        path = os.pathsep.join(dict.fromkeys([package_root] + [p for p in sys.path if p] +
                                             os.environ.get("PYTHONPATH", "").split(os.pathsep)))  # fmt: skip
        env = dict(os.environ, PYTHONPATH=path)
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "diffopt.transforms.background_child", str(self.directory / "spec.pkl")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self.directory)

    def finished(self) -> Optional[int]:
        return self.process.poll()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        self._finalizer()


def _stop_process(process: subprocess.Popen, directory: pathlib.Path) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    shutil.rmtree(directory, ignore_errors=True)


class Loading:
    """A thread that compiles here, from the caches, the signatures a child compiled (or the saved compile found at
    optimize holds): it loads the compile cache entry ``cache`` again (what the child or an earlier run saved; None:
    the cache is off, torch's own caches hold it) and runs ``run_compiled(args, kwargs)`` once per signature, in
    order, with inputs of its shapes. The calls meanwhile keep running uncompiled: dynamo's tracing is host work, and
    the uncompiled calls replaying CUDA graphs hardly need the host."""

    def __init__(self, name: str, signatures: List[Tuple], run_compiled: Callable, cache, device: torch.device):
        self.signatures, self.error, self.where = list(signatures), None, ""
        self.started = time.perf_counter()
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, args=(run_compiled, cache, device), daemon=True,
                                       name=f"diffopt-load-{name}")  # fmt: skip
        self.thread.start()

    def _run(self, run_compiled: Callable, cache, device: torch.device) -> None:
        try:
            if cache is not None:
                cache.reload()
            if device.type == "cuda":
                _own_cuda_graph_trees()
            # A new thread starts on CUDA device 0 and without grad-mode state of its own.
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                for signature in self.signatures:
                    (grad, inference), args, kwargs = make_call(signature)
                    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                        run_compiled(args, kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        except BaseException as error:  # noqa: BLE001 - reported by the next call, which compiles in the foreground
            self.error = error
            self.where = traceback.format_exc(limit=-4)  # the innermost frames, for the warning
        self.seconds = time.perf_counter() - self.started

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> None:
        self.thread.join(timeout)


def _own_cuda_graph_trees() -> None:
    """Give this thread the CUDA-graph tree state inductor keeps per thread. Some torch versions (2.11 among them)
    set it up only in the thread that imported inductor (and in autograd's threads), so a compiled call with CUDA
    graphs in another thread failed an assertion. The trees this thread records into stay with the compiled code:
    the calls that run it later, in the caller's thread, replay them."""
    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if hasattr(local, "tree_manager_containers"):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


#: What :meth:`BackgroundCompile.call` returns for a call that runs the compiled code in this process.
COMPILE = object()


class BackgroundCompile:
    """For a :class:`~diffopt.transforms.compile.CompiledCall`: which calls run uncompiled while a child compiles.

    ``call(args, kwargs, run_compiled)`` runs a call uncompiled while its inputs are not compiled here yet (starting
    a child for inputs no child has compiled, and a :class:`Loading` thread for those one has), and returns
    :data:`COMPILE` once they are, or when this has given up (the reason logged; the model compiles here).
    ``run_compiled(args, kwargs)`` is the compiled call, which the thread runs. ``saved``: optimize found a saved
    compile, so the first inputs go to the thread after the first call, with no child. ``cuda_graphs``: the uncompiled calls
    replay CUDA graphs of the eager forward (eager_graphs.py)."""

    def __init__(self, module: torch.nn.Module, name: str, options: Dict[str, Any], *, dynamic_batch: bool,
                 new_step: bool, model_options: Dict[str, Any], entry_name: str, cache=None,
                 cuda_graphs: bool = False, saved: bool = False):  # fmt: skip
        from .eager_graphs import EagerGraphs

        self.module, self.name, self.options = module, name, dict(options)
        self.dynamic_batch, self.new_step, self.model_options = dynamic_batch, new_step, dict(model_options)
        self.entry_name, self.cache, self.saved = entry_name, cache, saved  # cache: a compile_cache.Entry, or None
        self.eager_graphs = EagerGraphs(module, name) if cuda_graphs else None
        self.seen: List[Tuple] = []  # every call signature, in the order it first came
        self.compiled: Set[Tuple] = set()  # in the caches (a child compiled them): the thread compiles them here
        self.loaded: Set[Tuple] = set()  # compiled here: their calls run compiled
        self.compiled_exact: Set[Tuple] = set()  # the calls (floats by value) found compiled, looked up first
        self.child: Optional[Child] = None
        self.loading: Optional[Loading] = None
        self.given_up: Optional[str] = None

    @property
    def detail(self) -> str:
        graphs = " (as CUDA graphs of the eager forward)" if self.eager_graphs is not None else ""
        if self.saved:
            return f"loaded from the saved compile in a thread while the first calls run uncompiled{graphs}"
        return f"compiled in a background process while the first calls run uncompiled{graphs}"

    def call(self, args, kwargs, run_compiled: Callable) -> Any:
        if self.given_up:
            return COMPILE
        try:
            exact = describe_call(args, kwargs)
            if exact in self.compiled_exact:  # the common case once compiled: one description a call (16 us)
                return COMPILE
            signature = exact if floats_select_graphs() else describe_call(args, kwargs, exact_floats=False)
        except Undescribable as why:
            self.give_up(f"a call input cannot be described to another process ({why})")
            return COMPILE
        if signature not in self.seen:
            self.seen.append(signature)
            if self.saved and len(self.seen) == 1:
                self.compiled.add(signature)  # what the saved compile holds: loaded here, no child
                logger.warning("diffopt: loading %s from the saved compile in a thread (seconds); running it "
                               "uncompiled until then", self.name)  # fmt: skip
            else:
                what = "" if len(self.seen) == 1 else " for new input shapes"
                logger.warning("diffopt: compiling %s%s in a background process (%s); running it uncompiled until "
                               "then", self.name, what, FOREGROUND)  # fmt: skip
        self._take_child()
        self._take_loading()
        if self.given_up:
            return COMPILE
        if signature in self.loaded:
            self.compiled_exact.add(exact)
            return COMPILE
        if self.eager_graphs is not None:
            # No recording while the thread runs compiled code: a recording must have the GPU to itself.
            output = self.eager_graphs.call(exact, args, kwargs, record=self.loading is None)
            if self.loading is not None:
                # Replays queue up faster than the GPU runs them, and a full launch queue blocks this thread in
                # the next launch, holding the GIL the thread's tracing needs (SDXL on an H200: a 40-s load instead
                # of 20). Waiting here releases it.
                torch.cuda.current_stream(execution_device(self.module)).synchronize()
        else:
            output = self.module._call_impl(*args, **kwargs)
        self._start_next(run_compiled)  # after the call: a new signature's graph is recorded before a thread starts
        return output

    def advance(self, run_compiled: Callable) -> None:
        """Take in a finished child or thread, and start what the signatures seen so far need next: a thread for
        those compiled elsewhere but not here, a child for those compiled nowhere."""
        self._take_child()
        self._take_loading()
        self._start_next(run_compiled)

    def _start_next(self, run_compiled: Callable) -> None:
        if self.given_up:
            return
        to_load = [s for s in self.seen if s in self.compiled and s not in self.loaded]
        if self.loading is None and to_load:
            # Each thread has something new in the cache entry to load: a child's work, or the saved compile.
            self.loading = Loading(self.name, to_load, run_compiled, self.cache, execution_device(self.module))
        if self.child is None and any(s not in self.compiled for s in self.seen):
            self._start()

    def wait(self, run_compiled: Callable, timeout: Optional[float] = None) -> bool:
        """Block until every signature seen so far runs compiled here (or this gave up), or ``timeout`` seconds;
        True unless the time ran out."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.given_up and any(s not in self.loaded for s in self.seen):
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                return False
            try:
                if self.child is not None:
                    self.child.process.wait(left)
                elif self.loading is not None:
                    self.loading.wait(left)
            except subprocess.TimeoutExpired:
                return False
            self.advance(run_compiled)
        return True

    def _spec(self) -> Dict[str, Any]:
        module, cls = self.module, type(self.module)
        return dict(
            model=(cls.__module__, cls.__qualname__), config=dict(module.config), device=str(execution_device(module)),
            structure=structure(module), model_options=self.model_options, options=self.options, name=self.name,
            dynamic_batch=self.dynamic_batch, new_step=self.new_step, entry_name=self.entry_name,
            cache=(str(self.cache.directory), self.cache.key) if self.cache is not None else None,
            settings=compile_settings(),
        )  # fmt: skip

    def _start(self) -> None:
        try:
            self.child = Child(self._spec(), self.seen)
        except Exception as error:  # noqa: BLE001 - no child: compile here, as without the option
            self.give_up(f"the background process did not start ({type(error).__name__}: {error})")

    def _take_child(self) -> None:
        child = self.child
        if child is None or child.finished() is None:
            return
        self.child = None
        code, seconds = child.process.returncode, time.perf_counter() - child.started
        if code != 0:
            tail = child.log_tail()
            child.stop()
            self.give_up(f"the background compile failed (exit code {code}): {tail}")
            return
        child.stop()
        self.compiled.update(child.signatures)
        logger.warning("diffopt: %s compiled in a background process in %.1f s; loading it here in a thread "
                       "(seconds) while the calls go on uncompiled", self.name, seconds)  # fmt: skip

    def _take_loading(self) -> None:
        loading = self.loading
        if loading is None or not loading.done():
            return
        self.loading = None
        if loading.error is not None:
            error = loading.error
            self.give_up(f"loading the compiled code failed ({type(error).__name__}: {str(error)[:300]}); where: "
                         f"{loading.where}")  # fmt: skip
            return
        self.loaded.update(loading.signatures)
        if self.eager_graphs is not None:
            self.eager_graphs.clear()  # shapes still uncompiled record again
        logger.warning("diffopt: %s runs compiled from its next call on (loaded in %.1f s)", self.name, loading.seconds)

    def give_up(self, reason: str) -> None:
        self.given_up = reason
        logger.warning("diffopt: %s: %s; compiling it in this process instead (%s)", self.name, reason, FOREGROUND)
        self.stop()

    def stop(self) -> None:
        """End a running child, wait for a running thread (it cannot be stopped; it takes seconds), and free the
        recorded eager graphs (restore, or given up); what the child saved so far stays saved."""
        if self.child is not None:
            self.child.stop()
            self.child = None
        if self.loading is not None:
            self.loading.wait()
            self.loading = None
        if self.eager_graphs is not None:
            self.eager_graphs.clear()

    def copy_for(self, module: torch.nn.Module) -> "BackgroundCompile":
        """A fresh one for a copy of the model (the same cache entry): the copy's calls start their own child."""
        return BackgroundCompile(module, self.name, self.options, dynamic_batch=self.dynamic_batch,
                                 new_step=self.new_step, model_options=self.model_options, entry_name=self.entry_name,
                                 cache=self.cache, cuda_graphs=self.eager_graphs is not None, saved=self.saved)  # fmt: skip

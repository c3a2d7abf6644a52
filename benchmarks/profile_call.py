"""Where one steady call from ``pipe(...)`` to PIL images spends its time, and where the GPU idles: torch.profiler.

    python benchmarks/profile_call.py --pipelines sd-txt2img,sdxl --recipes sdpa,diffusers-compile,diffopt \\
        --batch-size 1 --out profile-out [--size full|tiny] [--dtype fp16] [--device cuda] [--steps N] \\
        [--warmup 2] [--traces]

For each pipeline (each stage of IF) and recipe: a fresh pipeline with the recipe applied (so that recipes do not
stack), ``--warmup`` calls to PIL images (compilation and CUDA graph capture happen there), then one more call to PIL
images under ``torch.profiler`` (CPU activity, plus CUDA on a GPU). That call is split into three parts by where the
host is: ``decode`` (inside ``vae.decode``), ``postprocess`` (inside the post-processing to PIL) and ``loop``
(everything else: the denoising loop, and the input checks, prompt and latent set-up and scheduler work around it).
The parts are ``record_function`` ranges put around the methods of :func:`diffopt.bench.split.split_targets`
(:func:`diffopt.bench.split.labelled_methods`); unlike the bench's timed split they add no synchronization, so
the call runs as a user's would. Per part:

* wall ms: host time in the part; loop + decode + postprocess = the call;
* on CUDA, GPU busy ms: time in the part while at least one kernel, memcpy or memset runs on the GPU (the union of
  their intervals), GPU idle ms = wall - busy; GPU launched ms: device time of the work the part launched (the
  decode's kernels can still be running when the host has moved on to the post-processing and waits there);
  device-to-host and host-to-device copies, synchronizing CUDA calls (stream, device and event synchronizes,
  device-to-host ``cudaMemcpy``/``cudaMemcpyAsync``) by name and the host's seconds in them.

And per call, on CUDA: the largest GPU idle gaps (offset in the call, length, part), idle seconds by gap length
(many short gaps: the host cannot launch fast enough; a few long ones: the host waits or works alone), and the
top kernels by GPU time; everywhere: the top CPU ops by self time (``key_averages``).

The GPU timeline is read from the profiler's Chrome trace (the kineto JSON that ``export_chrome_trace`` writes):
it names each device event's kind (``kernel``, ``gpu_memcpy``, ``gpu_memset``; not the ``gpu_user_annotation``
copies of the ranges) and ties it to the runtime call that launched it (``args.correlation``). The profiler adds
host time to every op: the profiled call is slower than the last warm-up call (also written) by about that much,
and host-bound gaps between kernels are longer than without it.

Writes DIR/profile.json (every number, in seconds, and the environment), DIR/profile.md (a table per pipeline)
and, with ``--traces``, each profiled call's trace as DIR/<pipeline>-<recipe>.json.gz (chrome://tracing, Perfetto).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Optional

import torch

from diffopt.bench.command import _device, _pipelines, _positive_int, _recipes  # the bench's own argument checks
from diffopt.bench.env import environment, free_memory, sync
from diffopt.bench.pipelines import build_case
from diffopt.bench.recipes import resolve
from diffopt.bench.runner import DEFAULTS, DTYPES, default_device
from diffopt.bench.split import DECODE, POSTPROCESS, labelled_methods, split_targets

CALL, LOOP = "call", "loop"
PARTS = (LOOP, DECODE, POSTPROCESS)
#: Kineto's categories of work on the device: what makes the GPU busy. Its "gpu_user_annotation" events (the
#: record_function ranges drawn on the GPU's timeline) and any other device events are not work.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CUDA_CALLS = ("cuda_runtime", "cuda_driver")
#: Calls that block the host until the GPU is done with (some of) its queue.
SYNCHRONIZING = {
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
    "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize",
}  # fmt: skip
#: CUPTI may write a runtime call with its entry point's suffix ("cudaStreamSynchronize_v3020", "..._ptsz_v7000").
_SUFFIX = re.compile(r"(?:_ptsz|_ptds)?(?:_v\d+)?$")
#: Idle seconds by gap length: upper bounds in seconds, and the names they are written under.
GAP_BINS = ((10e-6, "under 10 us"), (100e-6, "10-100 us"), (1e-3, "0.1-1 ms"), (math.inf, "1 ms and over"))
TOP_GAPS, TOP_KERNELS, TOP_CPU_OPS = 5, 10, 10
RECIPES = ("sdpa", "diffusers-compile", "diffopt")


# --- reading a trace ------------------------------------------------------------------------------------------

Intervals = list[tuple[float, float]]


def _union(intervals) -> Intervals:
    """Sorted, non-overlapping intervals covering the same time as ``intervals``."""
    merged: Intervals = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _length(intervals: Intervals) -> float:
    return sum(end - start for start, end in intervals)


def _intersection(a: Intervals, b: Intervals) -> Intervals:
    """Both already :func:`_union` ed."""
    found, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            found.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return found


def _difference(a: Intervals, b: Intervals) -> Intervals:
    """The time of ``a`` outside ``b``; both already :func:`_union` ed."""
    found = []
    for start, end in a:
        for cut_start, cut_end in b:
            if cut_end <= start or cut_start >= end:
                continue
            if cut_start > start:
                found.append((start, cut_start))
            start = max(start, cut_end)
            if start >= end:
                break
        if start < end:
            found.append((start, end))
    return found


def _contains(intervals: Intervals, t: float) -> bool:
    return any(start <= t <= end for start, end in intervals)


def _span(event: dict) -> tuple[float, float]:
    start = float(event["ts"])
    return start, start + float(event.get("dur", 0.0))


def _correlation(event: dict):
    """The id kineto gives a runtime call and the device work it launched (a graph launch: all its kernels)."""
    return (event.get("args") or {}).get("correlation")


def _base_name(name: str) -> str:
    return _SUFFIX.sub("", name)


class _Parts:
    """The call's time cut into the parts: each instant of the call is in exactly one (intervals in microseconds)."""

    def __init__(self, ranges: list[dict]):
        calls = [event for event in ranges if event.get("name") == CALL]
        if not calls:
            raise ValueError(f"no host range named {CALL!r} in the trace")
        call = max(calls, key=lambda event: float(event.get("dur", 0.0)))
        self.start, self.end = _span(call)
        self.window = [(self.start, self.end)]

        def labelled(part: str) -> Intervals:
            found = [_span(e) for e in ranges if e.get("name") == part and e.get("tid") == call.get("tid")]
            return _intersection(_union(found), self.window)

        decode = labelled(DECODE)
        postprocess = _difference(labelled(POSTPROCESS), decode)  # a decode inside the post-processing counts once
        loop = _difference(self.window, _union(decode + postprocess))
        self.windows = {LOOP: loop, DECODE: decode, POSTPROCESS: postprocess}

    def at(self, t: float) -> Optional[str]:
        """The part the host was in at ``t``; None outside the call."""
        if not self.start <= t <= self.end:
            return None
        return next((part for part in (DECODE, POSTPROCESS) if _contains(self.windows[part], t)), LOOP)

    def across(self, start: float, end: float) -> str:
        """The parts an interval runs through, in order: ``"loop > decode"``."""
        starts = {part: found[0][0] for part in PARTS if (found := _intersection([(start, end)], self.windows[part]))}
        return " > ".join(sorted(starts, key=starts.get))


def analyze(trace: dict) -> dict:
    """What one profiled call did, from its Chrome trace (a dict, as ``json.load`` reads the file
    ``export_chrome_trace`` wrote): the parts' wall seconds and, where the trace has device work, the GPU's.

    The call is the host range named ``call``, the parts those named ``decode`` and ``postprocess`` inside it;
    every instant of the call belongs to one part (the loop is what the other two leave), so the parts' seconds add
    up to the call's. Device work counts in the part the host was in while it ran (busy, idle) and in the part
    whose runtime call launched it (launched seconds, copies). Times in the trace are microseconds.
    """
    events = [event for event in trace.get("traceEvents", []) if event.get("ph") == "X" and "ts" in event]
    parts = _Parts([event for event in events if event.get("cat") == "user_annotation"])
    numbers = {part: {"wall_s": _length(parts.windows[part]) * 1e-6} for part in PARTS}
    result: dict[str, Any] = {"call_s": (parts.end - parts.start) * 1e-6, "parts": numbers, "gpu": None, "warnings": []}
    work = [event for event in events if event.get("cat") in DEVICE_WORK]
    if not work:  # a CPU run, or CUDA without CUPTI: the wall split is all there is
        return result
    host_calls = [event for event in events if event.get("cat") in HOST_CUDA_CALLS]
    busy = _intersection(_union(_span(event) for event in work), parts.window)
    for part, found in _launches_and_syncs(work, host_calls, parts).items():
        busy_s = _length(_intersection(busy, parts.windows[part])) * 1e-6
        numbers[part].update(gpu_busy_s=busy_s, gpu_idle_s=max(numbers[part]["wall_s"] - busy_s, 0.0), **found)
    busy_s = _length(busy) * 1e-6
    kernels = [event for event in work if event.get("cat") == "kernel" and parts.at(float(event["ts"])) is not None]
    result["gpu"] = {
        "busy_s": busy_s,
        "idle_s": max(result["call_s"] - busy_s, 0.0),
        "kernels": len(kernels),
        **_idle_gaps(_difference(parts.window, busy), parts),
        "top_kernels": _top_kernels(kernels),
    }
    result["warnings"] += _missed_graph_work(work, host_calls)
    return result


def _launches_and_syncs(work: list[dict], host_calls: list[dict], parts: _Parts) -> dict[str, dict]:
    """Per part: the device seconds it launched, its copies each way, its synchronizing calls and their seconds."""
    launcher = {_correlation(event): event for event in host_calls if _correlation(event) is not None}
    launched: dict[str, list] = {part: [] for part in PARTS}
    copies = {part: {"d2h_copies": 0, "h2d_copies": 0} for part in PARTS}
    copied_back = set()
    for event in work:
        name, source = event.get("name", ""), launcher.get(_correlation(event))
        if event.get("cat") == "gpu_memcpy" and "DtoH" in name and _correlation(event) is not None:
            copied_back.add(_correlation(event))
        part = parts.at(float((source or event)["ts"]))
        if part is None:
            continue
        launched[part].append(_span(event))
        if event.get("cat") == "gpu_memcpy" and ("DtoH" in name or "HtoD" in name):
            copies[part]["d2h_copies" if "DtoH" in name else "h2d_copies"] += 1
    syncs: dict[str, dict[str, int]] = {part: {} for part in PARTS}
    waits = {part: 0.0 for part in PARTS}
    for event in host_calls:
        part, name = parts.at(float(event["ts"])), _base_name(event.get("name", ""))
        # A copy to the host returns when the copy is done, so the host waits for everything queued before it.
        copy_back = name.startswith(("cudaMemcpy", "cuMemcpy")) and _correlation(event) in copied_back
        if part is not None and (name in SYNCHRONIZING or copy_back):
            syncs[part][name] = syncs[part].get(name, 0) + 1
            waits[part] += float(event.get("dur", 0.0)) * 1e-6
    return {
        part: dict(
            gpu_launched_s=_length(_union(launched[part])) * 1e-6,
            **copies[part],
            sync_calls=dict(sorted(syncs[part].items())),
            syncs=sum(syncs[part].values()),
            host_sync_wait_s=waits[part],
        )
        for part in PARTS
    }


def _idle_gaps(gaps: Intervals, parts: _Parts) -> dict:
    """The largest idle gaps, and idle seconds and gap counts by gap length."""
    largest = sorted(gaps, key=lambda gap: gap[0] - gap[1])[:TOP_GAPS]
    seconds = {label: 0.0 for _, label in GAP_BINS}
    counts = {label: 0 for _, label in GAP_BINS}
    for start, end in gaps:
        length = (end - start) * 1e-6
        label = next(label for bound, label in GAP_BINS if length < bound)
        seconds[label] += length
        counts[label] += 1
    return {
        "largest_idle_gaps": [
            dict(start_s=(start - parts.start) * 1e-6, length_s=(end - start) * 1e-6, part=parts.across(start, end))
            for start, end in largest
        ],
        "idle_s_by_gap_length": seconds,
        "idle_gaps_by_length": counts,
    }


def _top_kernels(kernels: list[dict]) -> list[dict]:
    totals: dict[str, list] = {}
    for event in kernels:
        entry = totals.setdefault(event.get("name", "?"), [0, 0.0])
        entry[0] += 1
        entry[1] += float(event.get("dur", 0.0)) * 1e-6
    top = sorted(totals.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
    return [{"name": name, "count": count, "total_s": total, "mean_s": total / count} for name, (count, total) in top]


def _missed_graph_work(work: list[dict], host_calls: list[dict]) -> list[str]:
    # Kernels replayed from a CUDA graph carry the graph launch's correlation. A launch with no device work at all
    # means the profiler missed its kernels, and the GPU would look idle while it ran them.
    correlated = {_correlation(event) for event in work}
    launches = [e for e in host_calls if _base_name(e.get("name", "")) in ("cudaGraphLaunch", "cuGraphLaunch")]
    unseen = [event for event in launches if _correlation(event) not in correlated]
    if not unseen:
        return []
    return [
        f"{len(unseen)} of {len(launches)} CUDA graph launches have no device work in the trace: "
        "GPU busy seconds undercount"
    ]


def top_cpu_ops(prof, exclude=(CALL, *PARTS), limit: int = TOP_CPU_OPS) -> list[dict]:
    """The CPU ops with the most self time (their own, not their children's) over the profile."""
    averages = [event for event in prof.key_averages() if event.key not in exclude and event.self_cpu_time_total > 0]
    averages.sort(key=lambda event: -event.self_cpu_time_total)
    return [
        {
            "name": event.key,
            "count": event.count,
            "self_s": event.self_cpu_time_total * 1e-6,
            "total_s": event.cpu_time_total * 1e-6,
        }
        for event in averages[:limit]
    ]


# --- profiling a stage ----------------------------------------------------------------------------------------


def _activities(device: torch.device) -> list:
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda" and torch.cuda.is_available()
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])


def _timed_call(stage, batch_size: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        stage.call(batch_size, "pil")
    sync(device)
    return time.perf_counter() - start


def profile_stage(stage, batch_size: int, device: torch.device, warmup: int, trace_path: Optional[str] = None) -> dict:
    """Warm ``stage`` with ``warmup`` calls to PIL images, then profile one more; :func:`analyze` 's numbers plus
    the warm-up calls' seconds, the profiled call's own seconds and the top CPU ops. With ``trace_path``, the
    profiled call's Chrome trace is also written there, gzipped. The stage's pipeline is as it was on return."""
    from torch.profiler import profile, record_function

    batch_size = 1 if stage.single_batch else batch_size
    warm = [_timed_call(stage, batch_size, device) for _ in range(warmup)]
    sync(device)
    targets = split_targets(stage.pipe)
    with labelled_methods(targets) as labelled:
        with profile(activities=_activities(device)) as prof:
            start = time.perf_counter()
            with torch.inference_mode(), record_function(CALL):
                stage.call(batch_size, "pil")
            sync(device)
            profiled_s = time.perf_counter() - start
    # Kineto writes a trace once per profile; the file is read back here and kept only when asked for.
    with tempfile.TemporaryDirectory(prefix="profile-call-") as scratch:
        path = os.path.join(scratch, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            trace = json.load(handle)
        if trace_path:
            with open(path, "rb") as source, gzip.open(trace_path, "wb") as target:
                shutil.copyfileobj(source, target)
    result = analyze(trace)
    # A part the pipeline does not have (IF's stages I and II decode nothing) is simply absent; one it has but whose
    # method could not be replaced ran unlabelled, inside the loop's seconds.
    unlabelled = [part for part in targets if part not in labelled]
    result["warnings"] += [f"{part}: could not be labelled; its time is in the loop's" for part in unlabelled]
    result.update(
        parts_present=[LOOP, *labelled],
        batch_size=batch_size,
        steps=stage.steps,
        warm_calls_s=warm,
        profiled_call_s=profiled_s,
        top_cpu_ops=top_cpu_ops(prof),
        trace=os.path.basename(trace_path) if trace_path else None,
    )
    return result


def _trace_name(pipeline: str, label: str, recipe: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", recipe).strip("_")
    return f"{pipeline}{'-' + label if label else ''}-{safe}.json.gz"


def _warm_up_profiler(device: torch.device) -> None:
    # The first profile of a process sets CUPTI up; that cost belongs to no pipeline.
    from torch.profiler import profile

    if device.type == "cuda":
        with profile(activities=_activities(device)):
            (torch.ones(8, device=device) * 2).sum().item()


# --- the command ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", type=_pipelines, required=True, help="comma-separated, or all")
    parser.add_argument("--recipes", type=_recipes, default=list(RECIPES),
                        help=f"comma-separated specs, as diffopt bench takes them (default: {','.join(RECIPES)})")
    parser.add_argument("--batch-size", type=_positive_int, default=1)
    parser.add_argument("--size", choices=["full", "tiny"], default=None, help="default: full on CUDA, tiny on CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=_positive_int, default=None, help="default: the size's own")
    parser.add_argument("--warmup", type=_positive_int, default=2, help="calls before the profiled one (default: 2)")
    parser.add_argument("--traces", action="store_true", help="also keep each profiled call's Chrome trace, gzipped")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    defaults = DEFAULTS["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    args.size = args.size or defaults["size"]
    args.dtype = args.dtype or defaults["dtype"]
    return args  # fmt: skip


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Profile every pipeline x recipe of ``args``; writes profile.json and profile.md after each result, so that
    a run stopped part-way keeps what it measured. Errors (an OOM included) are recorded, never raised."""
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    report = {
        "settings": {key: value for key, value in vars(args).items()},
        "environment": environment(device, argv),
        "results": [],
    }
    _warm_up_profiler(device)
    for pipeline in args.pipelines:
        for spec in args.recipes:
            recipe = resolve(spec)
            case = None
            free_memory(device)  # the previous recipe's pipeline and compiled graphs
            try:
                case = build_case(pipeline, size=args.size, device=device, dtype=DTYPES[args.dtype], steps=args.steps)
                notes = [recipe.apply(stage.pipe) for stage in case.stages]
            except Exception as error:  # noqa: BLE001 - one recipe's failure must not lose the others
                _record(report, args, dict(pipeline=pipeline, stage="", recipe=recipe.name), error)
                continue
            for stage, note in zip(case.stages, notes):
                entry = dict(pipeline=pipeline, stage=stage.label, recipe=recipe.name, recipe_note=note)
                trace = _trace_name(pipeline, stage.label, recipe.name) if args.traces else None
                try:
                    result = profile_stage(stage, args.batch_size, device, args.warmup,
                                           os.path.join(args.out, trace) if trace else None)  # fmt: skip
                except Exception as error:  # noqa: BLE001
                    _record(report, args, entry, error)
                    free_memory(device)
                    continue
                _record(report, args, {**entry, "status": "ok", **result})
    case = None
    free_memory(device)
    return report


def _record(report: dict, args, entry: dict, error: Optional[BaseException] = None) -> None:
    if error is not None:
        entry.update(status="error", error=f"{type(error).__name__}: {str(error).strip()[:300]}",
                     traceback=traceback.format_exc())  # fmt: skip
    report["results"].append(entry)
    print(_summary(entry), flush=True)
    write_outputs(report, args.out)


def write_outputs(report: dict, out: str) -> None:
    with open(os.path.join(out, "profile.json"), "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    with open(os.path.join(out, "profile.md"), "w") as handle:
        handle.write(to_markdown(report))


def _ms(seconds: Optional[float]) -> str:
    """Milliseconds to a tenth from 10 ms, to three significant digits below (an idle gap of 0.042 ms shows)."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.1f}" if abs(ms) >= 10 else f"{ms:.3g}"


def _title(entry: dict) -> str:
    return entry["pipeline"] + (f" stage {entry['stage']}" if entry.get("stage") else "")


def _summary(entry: dict) -> str:
    head = f"{_title(entry)}, {entry['recipe']}:"
    if entry.get("status") != "ok":
        return f"{head} {entry.get('error')}"
    parts = ", ".join(f"{part} {_ms(entry['parts'][part]['wall_s'])}" for part in PARTS)
    idle = f"; GPU idle {_ms(entry['gpu']['idle_s'])} ms" if entry.get("gpu") else ""
    return f"{head} call {_ms(entry['call_s'])} ms ({parts}){idle}"


def to_markdown(report: dict) -> str:
    settings, env = report["settings"], report["environment"]
    lines = [
        "# Where one call's time goes",
        "",
        f"torch {env.get('torch')}, diffusers {env.get('diffusers')}, {env.get('gpu') or env.get('device')}; "
        f"size {settings['size']}, {settings['dtype']}, batch {settings['batch_size']}, {settings['warmup']} warm-up "
        "calls before the profiled one. Parts by where the host is; GPU busy: a kernel, memcpy or memset running; "
        "GPU launched: device time of the work the part launched; syncs: synchronizing CUDA calls.",
    ]
    titles = list(dict.fromkeys(_title(entry) for entry in report["results"]))
    for title in titles:
        entries = [entry for entry in report["results"] if _title(entry) == title]
        lines += ["", f"## {title}", "", _row("recipe", "part", *COLUMNS), _row("---", "---", *["---:"] * len(COLUMNS))]
        for entry in entries:
            lines += _rows(entry)
        lines += [""] + [_notes(entry) for entry in entries if entry.get("status") == "ok"]
    return "\n".join(lines) + "\n"


COLUMNS = ("wall ms", "GPU busy ms", "GPU idle ms", "GPU launched ms", "syncs")


def _row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _rows(entry: dict) -> list[str]:
    """The call's row, then each part's."""
    recipe = entry["recipe"]
    if entry.get("status") != "ok":
        return [_row(recipe, "failed", entry.get("error"), *[""] * (len(COLUMNS) - 1))]
    gpu, parts = entry.get("gpu"), entry["parts"]
    if gpu is None:
        rows = [(CALL, entry["call_s"])] + [(part, parts[part]["wall_s"]) for part in _present(entry)]
        return [_row(recipe, name, _ms(wall), *["-"] * (len(COLUMNS) - 1)) for name, wall in rows]
    launched = sum(parts[part]["gpu_launched_s"] for part in PARTS)
    syncs = sum(parts[part]["syncs"] for part in PARTS)
    rows = [_row(recipe, CALL, _ms(entry["call_s"]), _ms(gpu["busy_s"]), _ms(gpu["idle_s"]), _ms(launched), syncs)]
    for part in _present(entry):
        n = parts[part]
        rows.append(_row(recipe, part, *map(_ms, (n["wall_s"], n["gpu_busy_s"], n["gpu_idle_s"], n["gpu_launched_s"])),
                         n["syncs"]))  # fmt: skip
    return rows


def _present(entry: dict) -> list[str]:
    return [part for part in PARTS if part in entry.get("parts_present", PARTS)]


def _notes(entry: dict) -> str:
    warm, gpu = entry.get("warm_calls_s") or [], entry.get("gpu")
    said = [f"last warm-up call without the profiler {_ms(warm[-1])} ms" if warm else ""]
    if gpu:
        gaps = [
            f"{_ms(gap['length_s'])} ms at +{_ms(gap['start_s'])} ms ({gap['part']})"
            for gap in gpu["largest_idle_gaps"][:3]
        ]
        said.append(f"largest GPU idle gaps: {', '.join(gaps) or 'none'}")
        kernels = [f"{_short(kernel['name'])} {_ms(kernel['total_s'])} ms" for kernel in gpu["top_kernels"][:3]]
        said.append(f"top kernels: {', '.join(kernels)}")
    ops = [f"{_short(op['name'])} {_ms(op['self_s'])} ms" for op in entry["top_cpu_ops"][:3]]
    said.append(f"top CPU ops (self): {', '.join(ops)}")
    said += [f"warning: {warning}" for warning in entry.get("warnings", [])]
    return f"- {entry['recipe']}: " + "; ".join(part for part in said if part) + "."


def _short(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    report = run(args, [sys.argv[0], *argv])
    print(f"profile: {os.path.join(args.out, 'profile.json')}, {os.path.join(args.out, 'profile.md')}")
    return 0 if all(entry.get("status") == "ok" for entry in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

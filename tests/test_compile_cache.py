"""The managed cache of torch's compile artifacts: where it lives, what invalidates an entry, and that a broken
cache costs a warning and a recompile, never an exception."""
import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_unet

from diffopt import compile_cache as cc

CPU = torch.device("cpu")
OPTIONS = {"fullgraph": True}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (cc.ENV_VAR, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# ---- resolve_directory -------------------------------------------------------------------------------------------


def test_default_is_under_home_without_xdg(clean_env):
    assert cc.resolve_directory(None) == clean_env / "home" / ".cache" / "diffopt"
    assert not (clean_env / "home").exists()  # nothing is created until something is saved


def test_default_follows_xdg_cache_home(clean_env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    assert cc.resolve_directory(None) == clean_env / "xdg" / "diffopt"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid by the XDG spec: ignored
    assert cc.resolve_directory(None) == clean_env / "home" / ".cache" / "diffopt"


def test_env_var_overrides_xdg(clean_env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    monkeypatch.setenv(cc.ENV_VAR, str(clean_env / "mine"))
    assert cc.resolve_directory(None) == clean_env / "mine"
    monkeypatch.setenv(cc.ENV_VAR, "~/kernels")
    assert cc.resolve_directory(None) == clean_env / "home" / "kernels"


@pytest.mark.parametrize("value", ["", "0", "off", "OFF", "False", " false "])
def test_env_var_disables(clean_env, monkeypatch, value):
    monkeypatch.setenv(cc.ENV_VAR, value)
    assert cc.resolve_directory(None) is None


def test_explicit_setting_wins_over_env(clean_env, monkeypatch):
    monkeypatch.setenv(cc.ENV_VAR, str(clean_env / "env"))
    assert cc.resolve_directory(str(clean_env / "given")) == clean_env / "given"
    assert cc.resolve_directory(clean_env / "given") == clean_env / "given"
    assert cc.resolve_directory(False) is None


@pytest.mark.parametrize("bad, error", [(True, TypeError), (3, TypeError), (b"/tmp", TypeError), ("", ValueError), ("  ", ValueError)])
def test_bad_settings_raise_naming_the_value_and_choices(bad, error):
    with pytest.raises(error, match=r"compile_cache=.*(None|False).*directory"):
        cc.resolve_directory(bad)
    with pytest.raises(error) as raised:
        cc.resolve_directory(bad)
    assert repr(bad) in str(raised.value)


# ---- artifact_key ------------------------------------------------------------------------------------------------


def test_key_is_stable_and_follows_what_is_compiled():
    unet = tiny_unet()
    key = cc.artifact_key(unet, OPTIONS, CPU, torch.float32)
    assert key == cc.artifact_key(tiny_unet(), dict(OPTIONS), CPU, torch.float32)
    others = {
        cc.artifact_key(tiny_unet(block_out_channels=(32, 32)), OPTIONS, CPU, torch.float32),
        cc.artifact_key(unet, OPTIONS, CPU, torch.bfloat16),
        cc.artifact_key(unet, {"fullgraph": True, "mode": "max-autotune"}, CPU, torch.float32),
        cc.artifact_key(unet, {"fullgraph": True, "options": {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}}, CPU, torch.float32),
    }
    assert key not in others and len(others) == 4
    # Option order does not matter, nor the address of a function in the options (it changes every run).
    same = {"options": {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}, "fullgraph": True}
    assert cc.artifact_key(unet, same, CPU, torch.float32) in others
    filters = [_guard_filter(), _guard_filter()]
    assert filters[0] is not filters[1]
    keys = {cc.artifact_key(unet, {"options": {"guard_filter_fn": f}}, CPU, torch.float32) for f in filters}
    assert len(keys) == 1


def _guard_filter():
    def keep_all(entries):
        return [True for _ in entries]

    return keep_all


def test_key_ignores_where_the_weights_came_from():
    unet, moved = tiny_unet(), tiny_unet()
    moved.register_to_config(_name_or_path="/somewhere/else")
    assert cc.artifact_key(unet, OPTIONS, CPU, torch.float32) == cc.artifact_key(moved, OPTIONS, CPU, torch.float32)


@pytest.mark.parametrize("package", ["torch", "triton", "diffusers", "diffopt"])
def test_key_changes_with_a_version(monkeypatch, package):
    unet = tiny_unet()
    key = cc.artifact_key(unet, OPTIONS, CPU, torch.float32)
    real = cc.package_version
    monkeypatch.setattr(cc, "package_version", lambda name: "9.9.9" if name == package else real(name))
    changed = cc.artifact_key(unet, OPTIONS, CPU, torch.float32)
    assert changed != key
    assert changed.split("-")[0] == key.split("-")[0]  # same model part: load can explain the miss
    assert cc.environment_fingerprint(CPU)[package] == "9.9.9"


def test_cpu_fingerprint_never_asks_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: pytest.fail("CUDA queried for a CPU model"))
    found = cc.environment_fingerprint("cpu")
    assert found["device"] == "cpu" and found["python"] == "%d.%d" % sys.version_info[:2]


# ---- load and save -----------------------------------------------------------------------------------------------


def _entry(directory, key, fingerprint, data=b"not really kernels"):
    entry = directory / key
    entry.mkdir(parents=True)
    (entry / cc.ARTIFACTS).write_bytes(data)
    (entry / cc.META).write_text(json.dumps({"fingerprint": fingerprint, "created": "now", "size": len(data)}))
    return entry


@pytest.fixture
def no_torch_load(monkeypatch):
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: pytest.fail("artifacts handed to torch"))


def test_entry_from_another_torch_is_refused_unread(tmp_path, no_torch_load):
    saved = dict(cc.environment_fingerprint(CPU), torch="2.11.0")
    _entry(tmp_path, "abc-def", saved)
    result = cc.load(tmp_path, "abc-def", CPU)
    assert result.status == "mismatch"
    assert f"saved for torch 2.11.0, this is torch {torch.__version__}: recompiling" == result.detail


def test_miss_is_explained_by_the_same_models_other_entry(tmp_path, no_torch_load):
    _entry(tmp_path, "abc-0000", dict(cc.environment_fingerprint(CPU), diffusers="0.30.0"))
    _entry(tmp_path, "zzz-1111", dict(cc.environment_fingerprint(CPU)))  # another model: says nothing
    result = cc.load(tmp_path, "abc-2222", CPU)
    assert result.status == "mismatch" and "diffusers 0.30.0, this is diffusers" in result.detail
    assert cc.load(tmp_path, "yyy-2222", CPU).status == "missing"


def test_nothing_saved_yet_is_missing_without_a_warning(tmp_path, no_torch_load):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cc.load(tmp_path / "never-made", "abc-def", CPU)
    assert result.status == "missing" and "compiling from scratch" in result.detail


def test_corrupt_artifacts_warn_and_fail(tmp_path):
    _entry(tmp_path, "abc-def", cc.environment_fingerprint(CPU), b"\x00garbage" * 10)
    with pytest.warns(RuntimeWarning, match="delete .*abc-def.*DIFFOPT_CACHE_DIR") as caught:
        result = cc.load(tmp_path, "abc-def", CPU)
    assert result.status == "failed" and len(caught) == 1


def test_truncated_artifacts_are_not_handed_to_torch(tmp_path, no_torch_load):
    entry = _entry(tmp_path, "abc-def", cc.environment_fingerprint(CPU), b"x" * 100)
    (entry / cc.ARTIFACTS).write_bytes(b"x" * 50)
    with pytest.warns(RuntimeWarning, match="50 bytes where 100"):
        assert cc.load(tmp_path, "abc-def", CPU).status == "failed"


def _pretend_compiled(monkeypatch, data=b"kernels" * 1000):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (data, None))


def test_save_then_load_round_trips_the_bytes(tmp_path, monkeypatch):
    _pretend_compiled(monkeypatch)
    saved = cc.save(tmp_path / "cache", "abc-def", CPU)
    assert saved.status == "saved" and saved.nbytes == 7000 and "0.0 MB" in saved.detail
    assert sorted(p.name for p in saved.path.iterdir()) == [cc.ARTIFACTS, cc.META]  # no temporary file left
    handed = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: handed.append(data) or "info")
    loaded = cc.load(tmp_path / "cache", "abc-def", CPU)
    assert loaded.status == "loaded" and handed == [b"kernels" * 1000]
    assert loaded.detail.startswith("loaded 0.0 MB of compiled kernels from ") and "this machine and versions" in loaded.detail


def test_save_under_a_file_warns_once_and_fails(tmp_path, monkeypatch):
    _pretend_compiled(monkeypatch)
    (tmp_path / "file").write_text("not a directory")
    with pytest.warns(RuntimeWarning, match=r"file/cache.*compile_cache.*DIFFOPT_CACHE_DIR=off") as caught:
        result = cc.save(tmp_path / "file" / "cache", "abc-def", CPU)
    assert result.status == "failed" and len(caught) == 1


def test_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    _pretend_compiled(monkeypatch)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cc.os, "replace", full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert cc.save(tmp_path, "abc-def", CPU).status == "failed"
    assert list((tmp_path / "abc-def").iterdir()) == []


def test_nothing_compiled_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    result = cc.save(tmp_path, "abc-def", CPU)
    assert result.status == "missing" and "nothing written" in result.detail
    assert not (tmp_path / "abc-def").exists()


def test_disabled_by_setting_or_by_an_old_torch(tmp_path, monkeypatch):
    assert cc.load(None, "abc-def", CPU).status == "disabled"
    assert cc.save(None, "abc-def", CPU).status == "disabled"
    monkeypatch.delattr(torch.compiler, "save_cache_artifacts")
    result = cc.load(tmp_path, "abc-def", CPU)
    assert result.status == "disabled" and f"torch {torch.__version__}" in result.detail


def test_copy_entries(tmp_path, monkeypatch):
    _pretend_compiled(monkeypatch)
    cc.save(tmp_path / "src", "abc-def", CPU)
    (copied,) = cc.copy_entries(tmp_path / "src", tmp_path / "image", ["abc-def"])
    assert (copied / cc.ARTIFACTS).read_bytes() == b"kernels" * 1000


# ---- for real, across processes ----------------------------------------------------------------------------------


def _side(role, cache, inductor_dir):
    script = pathlib.Path(__file__).with_name("_compile_cache_roundtrip.py")
    root = str(pathlib.Path(__file__).parents[1])
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script), role, str(cache)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.compile
def test_a_fresh_process_loads_what_another_compiled(tmp_path):
    cache = tmp_path / "diffopt-cache"
    a = _side("save", cache, tmp_path / "inductor-a")
    assert a["save"]["status"] == "saved" and a["inductor"].get("fxgraph_cache_miss", 0) > 0
    b = _side("load", cache, tmp_path / "inductor-b")  # an empty inductor cache: only the artifacts can help
    assert b["load"]["status"] == "loaded" and b["key"] == a["key"]
    assert b["inductor"].get("fxgraph_cache_hit", 0) > 0 and b["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert torch.allclose(torch.tensor(b["output"]), torch.tensor(a["output"]), rtol=0, atol=1e-6)
    print(f"\ncold first call {a['first_call_s']:.1f} s; after loading {b['load']['nbytes'] / 1e6:.1f} MB in "
          f"{b['load_s']:.2f} s, first call {b['first_call_s']:.1f} s")


@pytest.mark.compile
def test_optimize_saves_after_the_first_call_and_the_next_optimize_loads_it(tmp_path):
    import diffopt
    from conftest import tiny_unet, unet_inputs

    torch.compiler.reset()
    unet = tiny_unet()
    report = diffopt.optimize(unet, compile_cache=tmp_path, memory_format=None)
    (step,) = [s for s in report.applied if s.transform == "compile"]
    assert "no saved compile yet" in step.detail and str(tmp_path.name) in step.detail
    with torch.no_grad():
        first = unet(**unet_inputs(unet)).sample
    entries = [p.parent for p in tmp_path.glob("*/meta.json")]
    assert len(entries) == 1 and (entries[0] / "artifacts.bin").stat().st_size > 0

    torch.compiler.reset()  # as a new process would start
    again = tiny_unet()
    report = diffopt.optimize(again, compile_cache=tmp_path, memory_format=None)
    (step,) = [s for s in report.applied if s.transform == "compile"]
    assert step.detail.endswith("saved by an earlier run on this machine and versions"), step.detail
    with torch.no_grad():
        assert torch.allclose(again(**unet_inputs(again)).sample, first, atol=1e-5)
    diffopt.restore(unet), diffopt.restore(again)
    assert diffopt.optimize(tiny_unet(), compile_cache=False, compile={"backend": "eager"}).applied


def test_bad_compile_cache_values_are_refused_before_anything_changes():
    import diffopt
    from conftest import tiny_unet

    unet = tiny_unet()
    for bad in (True, 3, b"/tmp"):
        with pytest.raises(TypeError, match="compile_cache must be None"):
            diffopt.optimize(unet, compile_cache=bad)
    assert not diffopt.api.is_optimized(unet)


def test_every_call_that_compiles_is_saved_and_said(caplog):
    """A new batch size compiles again: that compile is announced and saved too, so a new process finds every
    shape this one compiled (the first call's save alone would miss it)."""
    import logging

    from conftest import tiny_unet, unet_inputs

    from diffopt.transforms.compile import apply_compile

    class Recording:
        loaded = cc.CacheResult("missing", "no saved compile yet")
        detail = "recording"

        def __init__(self):
            self.calls = []

        def after_compile(self, first):
            self.calls.append(first)
            return None

    torch.compiler.reset()
    unet, entry = tiny_unet(), Recording()
    applied = apply_compile(unet, {"backend": "eager", "fullgraph": True}, name="unet", cache=entry)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="diffopt"):
        unet(**unet_inputs(unet))
        unet(**unet_inputs(unet))  # the same shape: nothing compiles, nothing is saved
        unet(**unet_inputs(unet, batch=2))
    applied.undo()
    assert entry.calls == [True, False]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("diffopt: compiling unet") for m in messages)
    assert any(m.startswith("diffopt: compiled unet in") for m in messages)


@pytest.mark.compile
def test_every_shape_compiled_in_a_process_is_in_its_saved_entry(tmp_path, monkeypatch):
    # torch's blob holds a batch per save and its loader keeps the last batch of each kind: a second shape's save
    # used to leave a new process with that shape's graph only.
    from torch.compiler._cache import CacheArtifactManager

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # empty: both compiles are misses
    torch._dynamo.reset()

    def scaled(x):
        return torch.sin(x) * 3.25

    compiled = torch.compile(scaled, dynamic=False)  # one static graph per shape
    with CacheArtifactManager.with_fresh_cache():
        compiled(torch.randn(4))
        first = cc.save(tmp_path, "entry", "cpu")
        compiled(torch.randn(5))
        second = cc.save(tmp_path, "entry", "cpu")
    assert first.status == second.status == "saved" and second.nbytes > first.nbytes
    blob = (tmp_path / "entry" / cc.ARTIFACTS).read_bytes()
    kept = CacheArtifactManager.deserialize(blob)  # what torch.compiler.load_cache_artifacts reads
    assert len(kept["inductor"]) == 2  # both shapes' graphs
    torch._dynamo.reset()

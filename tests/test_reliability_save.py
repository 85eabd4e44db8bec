"""Crash-safe adapter files: every failure during a save leaves a directory that loads as exactly the old adapter or
exactly the new one, or refuses to load saying the save was interrupted; damaged files raise errors naming them."""

import errno
import json
import os

import pytest
import torch
import torch.nn as nn

import fastpeft
import fastpeft.utils.adapter_files as SL  # the module that writes the files
from fastpeft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from fastpeft.save_load import AdapterFileError, AdapterSaveError, InterruptedSaveError
from testing_utils import TinyQV as Tiny, tiny_qv as base, tiny_qv_lora as make


def out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def load(d):
    return PeftModel.from_pretrained(base(), str(d))


def files(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


@pytest.fixture
def old_and_new(tmp_path):
    """A directory holding the "old" adapter, and a different "new" model (other weights and lora_alpha)."""
    x = torch.randn(3, 8)
    old, new = make(alpha=8, seed=0), make(alpha=16, seed=1)
    d = tmp_path / "ad"
    old.save_pretrained(str(d))
    return d, old, new, x


def assert_loads_as(d, model, x):
    torch.testing.assert_close(out(load(d), x), out(model, x), rtol=0, atol=0)


def test_round_trip_and_record(old_and_new):
    d, old, new, x = old_and_new
    assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                     "fastpeft_save.json"]  # README.md: PEFT's model card
    assert_loads_as(d, old, x)
    new.save_pretrained(str(d))
    assert_loads_as(d, new, x)
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


@pytest.mark.parametrize("where", ["weights", "config"])
def test_serialiser_failure_leaves_old_files(old_and_new, monkeypatch, where):
    d, old, new, x = old_and_new
    before = files(d)

    def boom(*a, **k):
        raise RuntimeError("serialiser failed")

    if where == "weights":
        monkeypatch.setattr("safetensors.torch.save", boom)
    else:
        monkeypatch.setattr(type(new.peft_config["default"]), "_serialise", boom)
    with pytest.raises(RuntimeError, match="serialiser failed"):
        new.save_pretrained(str(d))
    assert files(d) == before
    assert_loads_as(d, old, x)


def test_writer_failure_is_oserror_naming_file(old_and_new, monkeypatch):
    d, old, new, x = old_and_new
    before = files(d)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SL.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(AdapterSaveError) as ei:
        new.save_pretrained(str(d))
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    msg = str(e)
    assert "'fastpeft_save.json'" in msg and repr(str(d)) in msg and "No space left on device" in msg
    assert "unchanged" in msg and "save again" in msg
    monkeypatch.undo()
    assert files(d) == before  # no temp file left either
    assert_loads_as(d, old, x)


def test_read_only_directory(old_and_new, monkeypatch):
    d, old, new, x = old_and_new
    before = files(d)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(SL.tempfile, "mkstemp", denied)
    with pytest.raises(OSError, match="could not write .* in directory .*Permission denied"):
        new.save_pretrained(str(d))
    monkeypatch.undo()
    assert files(d) == before


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_rename_failure_at_each_step(old_and_new, monkeypatch, fail_at):
    """os.replace fails (or the process dies) before the record (0), the weights (1) or the config (2) lands."""
    d, old, new, x = old_and_new
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(os.path.basename(dst))
        if len(calls) - 1 == fail_at:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(SL.os, "replace", flaky)
    with pytest.raises(AdapterSaveError):
        new.save_pretrained(str(d))
    monkeypatch.undo()
    assert calls[-1] == ["fastpeft_save.json", "adapter_model.safetensors", "adapter_config.json"][fail_at]
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
    if fail_at < 2:
        assert_loads_as(d, old, x)  # record new (or not) but weights old: the old adapter, exactly
    else:
        with pytest.raises(InterruptedSaveError) as ei:
            load(d)
        msg = str(ei.value)
        assert "come from two different saves" in msg and "interrupted" in msg and repr(str(d)) in msg
        assert "save the adapter again" in msg
        assert isinstance(ei.value, ValueError)
        new.save_pretrained(str(d))  # saving again repairs it
        assert_loads_as(d, new, x)


def test_same_config_new_weights_interrupted_loads_new(old_and_new, monkeypatch):
    """When only the weights change (a later checkpoint of the same run), a stop before the config lands leaves
    the new weights with an identical config: that is exactly the new adapter."""
    d, old, new, x = old_and_new
    same = make(alpha=8, seed=5)
    real = os.replace

    def flaky(src, dst):
        if os.path.basename(dst) == "adapter_config.json":
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(SL.os, "replace", flaky)
    with pytest.raises(AdapterSaveError):
        same.save_pretrained(str(d))
    monkeypatch.undo()
    assert_loads_as(d, same, x)


def test_config_edits(old_and_new):
    d, old, new, x = old_and_new
    p = d / "adapter_config.json"
    j = json.loads(p.read_text())
    j["base_model_name_or_path"] = "/somewhere/else"  # informational: still loads
    p.write_text(json.dumps(j))
    assert_loads_as(d, old, x)
    j["lora_alpha"] = 16  # changes what the weights mean
    p.write_text(json.dumps(j))
    with pytest.raises(InterruptedSaveError, match="edited by hand"):
        load(d)


def test_peft_written_directories_load(tmp_path):
    """Directories without a record (HF PEFT's), or whose weights another program rewrote after a fastpeft save
    (stale record), load normally."""
    x = torch.randn(3, 8)
    a, b = make(seed=0), make(seed=1)
    d = tmp_path / "ad"
    a.save_pretrained(str(d))
    os.remove(d / "fastpeft_save.json")
    assert_loads_as(d, a, x)
    a.save_pretrained(str(d))
    SL.save_peft_weights(b.base_model.get_adapter_state_dict("default"), str(d))  # e.g. written by HF PEFT
    assert_loads_as(d, b, x)


def test_truncated_weights(old_and_new):
    d, old, new, x = old_and_new
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    os.remove(d / "fastpeft_save.json")
    with pytest.raises(AdapterFileError) as ei:
        load(d)
    msg = str(ei.value)
    assert "'adapter_model.safetensors' in directory" in msg and repr(str(d)) in msg
    assert "damaged or was not completely written" in msg and "restore the file from a backup" in msg


@pytest.mark.parametrize("content,what", [("{not json", "is not valid JSON"), ("", "the file is empty"),
                                          ("[1, 2]", "holds a JSON list, not an object"),
                                          ("\xff\xfe".encode("latin-1"), "is not valid JSON")])
def test_bad_config_json(old_and_new, content, what):
    d, old, new, x = old_and_new
    p = d / "adapter_config.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    for call in (lambda: load(d), lambda: PeftConfig.from_pretrained(str(d))):
        with pytest.raises(AdapterFileError) as ei:
            call()
        msg = str(ei.value)
        assert what in msg and "'adapter_config.json' in directory" in msg and repr(str(d)) in msg
        assert "save the adapter again or restore the file from a backup" in msg


def test_bad_save_record(old_and_new):
    d, old, new, x = old_and_new
    (d / "fastpeft_save.json").write_text("[]")
    with pytest.raises(AdapterFileError, match="'fastpeft_save.json' in directory .* holds a JSON list"):
        load(d)


def test_invalid_config_value_in_file_names_file(old_and_new):
    d, old, new, x = old_and_new
    p = d / "adapter_config.json"
    j = json.loads(p.read_text())
    j["lora_alpha"] = float("nan")
    p.write_text(json.dumps(j))
    with pytest.raises(ValueError, match=r"'adapter_config.json' in directory .*: lora_alpha must be finite"):
        PeftConfig.from_pretrained(str(d))


def test_config_save_pretrained_is_atomic(tmp_path):
    cfg = LoraConfig(r=2, target_modules=["q"])
    cfg.save_pretrained(str(tmp_path))
    before = (tmp_path / "adapter_config.json").read_bytes()
    cfg.auto_mapping = {"x": object()}  # not JSON-serialisable: fails before the file is touched
    with pytest.raises(TypeError):
        cfg.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_config.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json"]


def test_bin_round_trip_with_record(tmp_path):
    x = torch.randn(3, 8)
    m = make()
    m.save_pretrained(str(tmp_path), safe_serialization=False)
    got = PeftModel.from_pretrained(base(), str(tmp_path), allow_bin=True)
    torch.testing.assert_close(out(got, x), out(m, x), rtol=0, atol=0)
    (tmp_path / "adapter_model.bin").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="'adapter_model.bin' in directory .* cannot be read"):
        PeftModel.from_pretrained(Tiny(), str(tmp_path), allow_bin=True)


def test_exports():
    assert issubclass(AdapterSaveError, OSError)
    assert issubclass(AdapterFileError, ValueError) and issubclass(InterruptedSaveError, AdapterFileError)
    assert fastpeft.save_load.SAVE_RECORD_NAME == "fastpeft_save.json"


def test_empty_weights_file(old_and_new):
    d, old, new, x = old_and_new
    (d / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFileError, match=r"'adapter_model.safetensors' in directory .* cannot be read"):
        load(d)


def test_directory_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    m = make()
    with pytest.raises(AdapterSaveError, match=r"could not create the adapter directory .*afile.*save again"):
        m.save_pretrained(str(tmp_path / "afile" / "sub"))
    with pytest.raises(AdapterSaveError, match=r"could not create the adapter directory"):
        LoraConfig(r=2, target_modules=["q"]).save_pretrained(str(tmp_path / "afile" / "sub"))
    assert (tmp_path / "afile").read_text() == "x"


def test_target_name_is_a_directory(old_and_new):
    d, old, new, x = old_and_new
    os.remove(d / "adapter_config.json")
    os.mkdir(d / "adapter_config.json")
    before = sorted(os.listdir(d)), (d / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AdapterSaveError, match=r"'adapter_config.json' in directory .* is a directory; remove or "
                                               r"rename it and save again \(nothing was written\)"):
        new.save_pretrained(str(d))
    assert (sorted(os.listdir(d)), (d / "adapter_model.safetensors").read_bytes()) == before


KILL_SCRIPT = r"""
import os, sys, torch, torch.nn as nn
sys.path.insert(0, {tests!r})
from testing_utils import tiny_qv_lora as make
import fastpeft.save_load as SL
real, calls = os.replace, []
def dying(src, dst):
    calls.append(dst)
    if len(calls) == {kill_at}:
        os._exit(17)  # the process is killed: no exception handler, no cleanup
    return real(src, dst)
SL.os.replace = dying
make(alpha=16, seed=1).save_pretrained({d!r})
"""


@pytest.mark.parametrize("kill_at", [2, 3])
def test_process_killed_between_files(old_and_new, kill_at):
    """A real process death (os._exit) before the weights (2) or before the config (3) is renamed into place."""
    import subprocess
    import sys

    d, old, new, x = old_and_new
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), kill_at=kill_at, d=str(d))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 17, r.stderr
    if kill_at == 2:
        assert_loads_as(d, old, x)
    else:
        with pytest.raises(InterruptedSaveError, match="interrupted"):
            load(d)
    new.save_pretrained(str(d))
    assert_loads_as(d, new, x)

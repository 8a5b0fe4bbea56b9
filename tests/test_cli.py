"""echoes/cli.py: atomic writes and one-line argument errors, shared by every script."""

import dataclasses
import os
import stat
import time

import pytest

from echoes import cli
from echoes.cli import parse_settings, remove_temps, setting, write_atomic


def test_write_atomic_replaces_or_refuses_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "f.bin"
    write_atomic(path, lambda f: f.write(b"one"))
    write_atomic(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        write_atomic(path, lambda f: f.write(b"three"), replace=False)
    write_atomic(tmp_path / "g.bin", lambda f: f.write(b"new"), replace=False)

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(cli.UserError, match=r"cannot write .*h.bin \(No space left on device\); "
                       r"free some space or choose another output folder$"):
        write_atomic(tmp_path / "h.bin", broken)
    with pytest.raises(cli.UserError, match="the existing file is kept"):
        write_atomic(path, broken)
    assert path.read_bytes() == b"two" and (tmp_path / "g.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "g.bin"]


def test_a_failed_torch_save_is_a_user_error_when_an_os_error_is_behind_it(tmp_path):
    """torch.save reports a failed write as a RuntimeError ("unexpected pos") raised while the
    OSError is handled: that becomes a one-line error naming the OSError; a RuntimeError with
    no OSError behind it is the caller's and stays as it is. A refused folder is one line too."""
    def quota(f):
        f.write(b"half")
        try:
            raise OSError(122, "Disk quota exceeded")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    def bug(f):
        raise RuntimeError("a tensor on the meta device")

    with pytest.raises(cli.UserError, match=r"\(Disk quota exceeded\); free some space"):
        write_atomic(tmp_path / "ckpt.pt", quota)
    with pytest.raises(RuntimeError, match="meta device"):
        write_atomic(tmp_path / "ckpt.pt", bug)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(cli.UserError, match=r"cannot write .*file/ckpt.pt \(File exists\); "
                                            "check the folder or choose another output folder"):
        write_atomic(tmp_path / "file" / "ckpt.pt", lambda f: f.write(b"x"))


@pytest.mark.skipif(cli.fcntl is None, reason="dead_only needs POSIX file locks")
def test_only_temp_files_of_dead_writers_are_removed(tmp_path):
    """What a run killed mid-write left goes; a live writer's (locked) temp file, one too new to
    tell, and other files stay, also the user's own named like temp files."""
    names = {"dead": cli.TEMP_PREFIX + "a1", "live": cli.TEMP_PREFIX + "b2",
             "new": cli.TEMP_PREFIX + "c3", "kept": "cat.wav", "theirs": ".tmp-notes.txt"}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if key != "new":
            os.utime(tmp_path / name, (time.time() - 60, time.time() - 60))
    writer = os.open(tmp_path / names["live"], os.O_RDWR)  # a writer still at work
    try:
        assert cli._lock(writer)
        remove_temps(tmp_path, dead_only=True)
    finally:
        os.close(writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        name for key, name in names.items() if key != "dead")
    remove_temps(tmp_path)  # no other writer: every temp file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-notes.txt", "cat.wav"]


@pytest.mark.skipif(cli.fcntl is None, reason="dead_only needs POSIX file locks")
def test_a_write_in_progress_keeps_its_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "TEMP_MIN_AGE_S", 0)  # only the writer's lock protects it

    def write(f):
        f.write(b"first half, ")
        remove_temps(tmp_path, dead_only=True)  # another run starting meanwhile
        f.write(b"second half")

    write_atomic(tmp_path / "a.bin", write)
    assert (tmp_path / "a.bin").read_bytes() == b"first half, second half"


def test_the_temp_file_is_synced_in_the_targets_folder_then_renamed(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace

    def syncing(fd):
        events.append("fsync")
        fsync(fd)

    def renaming(src, dst):
        events.append(("rename", os.path.dirname(src), os.path.dirname(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", syncing)
    monkeypatch.setattr(os, "replace", renaming)
    write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert events == ["fsync", ("rename", str(tmp_path), str(tmp_path))]


def test_written_files_get_the_umask_mode_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "shared.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "shared.bin").st_mode) == 0o644


def test_a_replaced_file_keeps_its_mode_a_link_is_written_through_a_folder_is_refused(tmp_path):
    (tmp_path / "private.bin").write_bytes(b"old")
    os.chmod(tmp_path / "private.bin", 0o600)
    write_atomic(tmp_path / "private.bin", lambda f: f.write(b"new"))
    assert stat.S_IMODE(os.stat(tmp_path / "private.bin").st_mode) == 0o600
    (tmp_path / "real.bin").write_bytes(b"old")
    os.symlink(tmp_path / "real.bin", tmp_path / "link.bin")
    write_atomic(tmp_path / "link.bin", lambda f: f.write(b"new"))
    assert (tmp_path / "link.bin").is_symlink() and (tmp_path / "real.bin").read_bytes() == b"new"
    (tmp_path / "folder").mkdir()
    with pytest.raises(cli.UserError, match="folder.* it is a folder; choose a file name"):
        write_atomic(tmp_path / "folder", lambda f: f.write(b"x"))


def test_the_callers_own_os_error_is_raised_not_taken_for_a_full_disk(tmp_path):
    def bad_format(f):
        raise OSError("cannot write mode RGBA as JPEG")  # no errno: PIL's, not the disk's

    with pytest.raises(OSError, match="RGBA as JPEG"):
        write_atomic(tmp_path / "a.jpg", bad_format)

    def short(f):
        raise OSError("1000 requested and 10 written")  # numpy's mark of a full disk

    with pytest.raises(cli.UserError, match="free some space"):
        write_atomic(tmp_path / "a.npy", short)
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_of_unknown_opcodes_is_unreadable_not_a_question_of_trust(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02" + bytes([197]) + b"\x00" * 40)
    with pytest.raises(cli.UserError, match="is not a readable PyTorch file"):
        cli.load_checkpoint(tmp_path / "junk.pt")


def test_a_byte_flipped_inside_a_tensor_is_a_damaged_file(tmp_path):
    """torch.load does not check the zip's CRC-32s: the weights would load changed, silently."""
    import torch
    torch.save({"w": torch.arange(4096.0)}, tmp_path / "whole.pt")
    assert cli.load_checkpoint(tmp_path / "whole.pt")["w"][-1] == 4095
    data = bytearray((tmp_path / "whole.pt").read_bytes())
    at = data.find(torch.tensor(2000.0).numpy().tobytes())  # inside the tensor's record
    data[at + 3] ^= 0x01
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(cli.UserError, match=r"flipped.pt is damaged \(whole/data/0 fails its "
                                            r"checksum\); re-download or re-create it"):
        cli.load_checkpoint(tmp_path / "flipped.pt")


def test_zip_members_without_a_checksum_load_and_a_flipped_flag_is_one_line(tmp_path):
    """torch can save without CRC-32s (stored as 0): nothing to check, the file loads. A flipped
    bit in a member's flags (zipfile: "encrypted") is a damaged file, not a traceback."""
    import struct

    import torch
    from torch.utils.serialization import config
    with config.patch({"save.compute_crc32": False}):  # torch's own way to set it for a while
        torch.save({"w": torch.arange(8.0)}, tmp_path / "nocrc.pt")
    assert cli.load_checkpoint(tmp_path / "nocrc.pt")["w"][-1] == 7
    torch.save({"w": torch.arange(8.0)}, tmp_path / "whole.pt")
    data = bytearray((tmp_path / "whole.pt").read_bytes())
    at = data.find(b"PK\x01\x02")  # the first central-directory entry; its flags at +8
    struct.pack_into("<H", data, at + 8, struct.unpack_from("<H", data, at + 8)[0] | 1)
    (tmp_path / "flag.pt").write_bytes(bytes(data))
    with pytest.raises(cli.UserError, match=r"flag.pt is damaged \(whole/\S+ cannot be read: "):
        cli.load_checkpoint(tmp_path / "flag.pt")


def test_device_name_names_the_cpu_model_and_threads():
    import torch
    name = cli.device_name("cpu")
    assert name.endswith(f", {torch.get_num_threads()} threads")
    if os.path.exists("/proc/cpuinfo"):
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")]
        if models:
            assert name.startswith(models[0])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about these files
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_checkpoints_of_every_pickle_protocol_load_or_ask_for_trust(tmp_path, protocol):
    import torch
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=protocol)
    try:  # torch's safe loader reads protocol 2; 4 and 5 need full unpickling
        got = cli.load_checkpoint(path)
    except cli.UserError as e:
        assert protocol > 2 and "pass --trust-checkpoints" in str(e)
        got = cli.load_checkpoint(path, trusted=True)
    assert torch.equal(got["w"], torch.ones(2))


@dataclasses.dataclass
class Settings:
    steps: int = setting(3, "steps")
    lr: float = setting(1e-3, "learning rate")
    trust: bool = setting(False, "trust")


def test_negative_numbers_are_values_and_flag_prefixes_are_unknown(capsys):
    assert parse_settings(Settings, ["--lr", "-1e-3"]).lr == -1e-3
    assert parse_settings(Settings, ["--lr", "-inf"]).lr == float("-inf")
    assert parse_settings(Settings, ["--steps", "-2"]).steps == -2
    for argv in (["--tru"], ["--st", "4"]):
        with pytest.raises(SystemExit) as e:
            parse_settings(Settings, argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    s = parse_settings(Settings, ["--lr", "inf"])
    with pytest.raises(cli.UserError, match="--lr must be at least 0, got inf"):
        cli.check_at_least(s, {"lr": 0})


def test_a_bad_option_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_settings(Settings, ["--steps", "3.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "argument --steps: invalid int value: '3.5'" in err[0] and "--help" in err[0]


def test_without_hard_links_a_new_file_still_never_replaces_one(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # FAT, some network mounts

    monkeypatch.setattr(os, "link", no_links)
    write_atomic(tmp_path / "a.bin", lambda f: f.write(b"first"), replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "a.bin", lambda f: f.write(b"second"), replace=False)
    assert (tmp_path / "a.bin").read_bytes() == b"first"

    def no_rename(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(cli.UserError, match="Input/output"):
        write_atomic(tmp_path / "b.bin", lambda f: f.write(b"x"), replace=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no empty claim left


def test_a_file_system_without_modes_still_gets_the_file(tmp_path, monkeypatch):
    def no_modes(fd, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", no_modes)
    write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert (tmp_path / "a.bin").read_bytes() == b"x"


def test_a_repeated_list_flag_adds_to_it():
    @dataclasses.dataclass
    class Lists:
        image: list[str] = setting([], "inputs")
        ops: list[str] = setting(["a", "b"], "ops", choices=["a", "b", "c"])

    assert parse_settings(Lists, []) == Lists(image=[], ops=["a", "b"])
    s = parse_settings(Lists, ["--image", "x.png", "--image", "y.png", "z.png", "--ops", "c"])
    assert s.image == ["x.png", "y.png", "z.png"] and s.ops == ["c"]  # the default replaced
    assert parse_settings(Lists, ["--ops", "c", "--ops", "a"]).ops == ["c", "a"]
    assert Lists().ops == ["a", "b"]  # the default itself untouched


def test_errors_name_the_command_as_it_is_typed(capsys):
    with pytest.raises(SystemExit):
        parse_settings(Settings, ["--steps", "x"], prog="python -m echoes.prepare")
    assert "(see python -m echoes.prepare --help)" in capsys.readouterr().err


def test_a_bookkeeping_dict_subclass_asks_for_trust_and_loads_with_it(tmp_path, monkeypatch):
    """Lightning's AttributeDict (a dict subclass) cannot be filled by the safe unpickler: that
    is a file asking for trust, not a corrupt one, and --trust-checkpoints loads it."""
    import sys
    import types

    import torch

    from echoes.cli import UserError, load_checkpoint
    module = types.ModuleType("lightning_fabric.utilities")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    for name in ("lightning_fabric", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else
                            types.ModuleType(name))
    path = tmp_path / "hp.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": AttributeDict(lr=1.0)},
               path)
    with pytest.raises(UserError, match="pass --trust-checkpoints"):
        load_checkpoint(path)
    assert load_checkpoint(path, trusted=True)["hyper_parameters"] == {"lr": 1.0}
    (tmp_path / "junk.ckpt").write_bytes(b"\x80\x02junk that is no pickle")
    with pytest.raises(UserError, match="is not a readable PyTorch file"):
        load_checkpoint(tmp_path / "junk.ckpt", trusted=True)
    (tmp_path / "text.ckpt").write_bytes(b"junk text 1234")  # torch raises a bare KeyError
    with pytest.raises(UserError, match=r"is not a PyTorch file \(no zip or pickle header\)"):
        load_checkpoint(tmp_path / "text.ckpt")
    torch.save({"w": torch.ones(64)}, tmp_path / "whole.pt")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    with pytest.raises(UserError, match=r"is not a readable PyTorch file \(RuntimeError: "):
        load_checkpoint(tmp_path / "torn.pt")


def test_lightning_bookkeeping_loads_without_lightning(tmp_path, monkeypatch, request):
    """A released Lightning checkpoint keys its "callbacks" by callback classes: it loads, safely,
    with no pytorch_lightning installed (the classes come back as inert stand-ins)."""
    import sys
    import types
    import typing

    import torch
    saved = torch.serialization.get_safe_globals()  # torch 2.4's path below adds to them

    def restore():
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)

    request.addfinalizer(restore)

    from echoes.cli import Bookkeeping, UserError, load_checkpoint

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/rec_loss"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else
                            types.ModuleType(name))
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "hparams": ModelCheckpoint(),
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # as on a machine without Lightning

    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2)) and ckpt["epoch"] == 3
    (key,) = ckpt["callbacks"]
    assert issubclass(key, Bookkeeping) and key.__name__ == "ModelCheckpoint"
    assert ckpt["hparams"].state == {"monitor": "val/rec_loss"}
    omega = types.ModuleType("omegaconf.dictconfig")  # hyper-parameters as OmegaConf keeps them

    class DictConfig:
        def __init__(self):
            self.content, self.key_type, self.element_type = {"embed_dim": 256}, typing.Any, dict

    DictConfig.__module__, DictConfig.__qualname__ = omega.__name__, "DictConfig"
    omega.DictConfig = DictConfig
    for name in ("omegaconf", omega.__name__):
        monkeypatch.setitem(sys.modules, name, omega if name == omega.__name__ else
                            types.ModuleType(name))
    torch.save({"state_dict": {}, "hyper_parameters": DictConfig()}, tmp_path / "omega.ckpt")
    # a typing name met before the library's, and typing names alone
    torch.save({"types": typing.Any, "hyper_parameters": DictConfig()}, tmp_path / "first.ckpt")
    torch.save({"types": typing.Any}, tmp_path / "alone.ckpt")
    for name in ("omegaconf", omega.__name__):
        monkeypatch.delitem(sys.modules, name)
    state = load_checkpoint(tmp_path / "omega.ckpt")["hyper_parameters"].state
    assert state["content"] == {"embed_dim": 256} and issubclass(state["key_type"], Bookkeeping)
    with pytest.raises(UserError, match="pass --trust-checkpoints"):
        load_checkpoint(tmp_path / "alone.ckpt")
    for attr in ("safe_globals", "get_unsafe_globals_in_checkpoint"):  # as torch 2.4 has it
        monkeypatch.delattr(torch.serialization, attr)
    assert load_checkpoint(path)["epoch"] == 3
    first = load_checkpoint(tmp_path / "first.ckpt")  # found one refusal at a time
    assert issubclass(first["types"], Bookkeeping) and first["hyper_parameters"].state[
        "content"] == {"embed_dim": 256}
    for _ in range(2):  # the stand-ins of a load do not outlive it
        with pytest.raises(UserError, match="pass --trust-checkpoints"):
            load_checkpoint(tmp_path / "alone.ckpt")
    other = tmp_path / "other.ckpt"  # any other class still needs --trust-checkpoints
    monkeypatch.setitem(sys.modules, "my_lab", module)
    ModelCheckpoint.__module__ = "my_lab"
    torch.save({"obj": ModelCheckpoint()}, other)
    with pytest.raises(UserError, match="pass --trust-checkpoints"):
        load_checkpoint(other)


def test_check_file_names_folders_devices_and_missing_paths(tmp_path):
    (tmp_path / "f.pt").write_bytes(b"x")
    cli.check_file(tmp_path / "f.pt", "checkpoint")
    for path, message in ((tmp_path, "is a folder, not a file"),
                          ("/dev/null", "is not a regular file"),
                          (tmp_path / "nope.pt", "checkpoint not found: ")):
        with pytest.raises(cli.UserError, match=message):
            cli.check_file(path, "checkpoint")
    with pytest.raises(cli.UserError, match=r"\(build it first\)$"):
        cli.check_file(tmp_path / "nope.pt", "bundle", "build it first")
    (tmp_path / "empty.wav").write_bytes(b"")
    cli.check_file(tmp_path / "empty.wav", "audio file")  # 0 bytes: refused only when asked
    with pytest.raises(cli.UserError, match=r"audio file .*empty.wav is empty \(0 bytes\); "
                       r"give a recording$"):
        cli.check_file(tmp_path / "empty.wav", "audio file", empty="give a recording")


def test_a_reader_gone_from_the_pipe_ends_the_run_quietly(tmp_path, monkeypatch):
    import io
    import sys

    def main(argv):
        raise BrokenPipeError(32, "Broken pipe")

    # streams with descriptors, as a pipe has (pytest's own must not be redirected)
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, [])
    assert e.value.code == 1
    out.write("dropped")  # both now write to the null device
    err.write("dropped")
    out.close()
    err.close()
    assert (tmp_path / "out.txt").read_text() == (tmp_path / "err.txt").read_text() == ""
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # no descriptor (a notebook): no error
    cli.stdout_gone()

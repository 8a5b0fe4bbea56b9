"""Shared plumbing for the scripts: settings, one-line errors, and checkpoint files.

- `setting()` / `parse_settings()`: each script keeps its settings in one dataclass near the top;
  every field becomes a `--flag` with its help text, unknown flags and wrong types are errors, and
  `dataclasses.asdict` gives the resolved settings to store in a checkpoint; `check_finite`,
  `check_at_least`, `check_rules` and `pick_device` turn impossible values into one-line
  errors.
- `UserError` / `run_cli()`: problems a user can fix (a missing file, an impossible option) are
  raised as `UserError` and printed as one line with exit code 2, never as a traceback.
- `load_checkpoint()` / `save_atomic()` / `write_atomic()`: safe loading of third-party pickles
  (`weights_only=True` first; full unpickling only with `--trust-checkpoints`) and atomic writes
  (temp file + rename), so a killed run never leaves a half-written checkpoint behind;
  `check_file`, `check_finite_weights` and `load_state_strict` turn a path that is no file,
  weights holding nan or inf and a state dict that does not fit its model into one-line errors.
"""

import argparse
import contextlib
import dataclasses
import errno
import functools
import math
import os
import pickle
import platform
import re
import sys
import tempfile
import time
import zipfile
import zlib

try:
    import fcntl  # POSIX: a writer's lock tells its temp file from a dead run's
except ImportError:
    fcntl = None

import torch


class UserError(Exception):
    """A problem the user can fix. Its message is one line: what is wrong and what to do.
    `node_wide` marks one that every process of a torchrun node finds alike (its settings, its
    files): the node's first process says it, the others only exit."""

    def __init__(self, message, node_wide=False):
        super().__init__(message)
        self.node_wide = node_wide


def follower():
    """Whether this is a torchrun process other than its node's first (LOCAL_RANK > 0 of
    WORLD_SIZE > 1): it keeps quiet about what the first process of its node says anyway."""
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1


def run_cli(main, argv=None):
    """Run `main(argv)`; a `UserError` becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as e:
        if not (e.node_wide and follower()):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # a reader has gone (`| head`): stop quietly, as shell tools do
        stdout_gone(sys.stdout, sys.stderr)
        sys.exit(1)


def stdout_gone(*streams):
    """Point stdout (or `streams`) at the null device once its reader has gone (`| head -1`), so
    that what is left to print is dropped rather than raising BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in streams or (sys.stdout,):
            try:
                os.dup2(devnull, stream.fileno())
            except (AttributeError, OSError, ValueError):  # no descriptor: a notebook, a capture
                pass
    finally:
        os.close(devnull)


# -----------------------------------------------------------------------------
# settings


def setting(default, help, choices=None):
    """A settings-dataclass field with its `--help` text (and allowed values)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, "choices": choices})
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _arg_type(f):
    """The Python type a field's command-line value is parsed to (from its annotation)."""
    t = f.type if isinstance(f.type, str) else (f.type.__name__ if isinstance(f.type, type)
                                                 else str(f.type))
    t = t.replace("typing.", "").replace(" ", "")
    if t.startswith("list["):  # list[str] -> nargs
        return t[5:-1], True
    return t.replace("|None", "").replace("Optional[", "").rstrip("]"), False


_PARSERS = {"int": int, "float": float, "str": str}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


class _ListAction(argparse.Action):
    """A list setting: its first use replaces the default and a repeated flag adds to it
    (`--image a.png --image b.png` is both), where argparse would keep the last use alone."""

    def __call__(self, parser, namespace, values, option_string=None):
        have = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if have is self.default else have), *values])


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (it prints the whole usage block first), no
    abbreviated flags (a prefix of a flag is an unknown flag), and negative numbers with an
    exponent or inf taken as values (`--lr -1e-3`, `--guidance -inf`, then refused as a
    value)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self._negative_number_matcher = re.compile(  # argparse's private hook for this
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.IGNORECASE)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def _print_message(self, message, file=None):
        if not follower():  # errors and --help: once per node under torchrun, not once per GPU
            super()._print_message(message, file)


def parse_settings(cls, argv=None, description=None, overrides=None, prog=None):
    """Build `cls` (a dataclass of `setting()` fields) from the command line.

    Field `global_batch` becomes `--global-batch`; bools become `--flag / --no-flag`; `list[...]`
    fields take several values, a repeated flag adding to them. `overrides` (a dict) replaces
    defaults before parsing, for checkpoint-stored defaults. `prog` names the command in usage
    and errors (default: the script's file name). Errors exit with code 2 (argparse's
    convention)."""
    parser = _Parser(prog=prog, description=description, formatter_class=_HelpFormatter)
    overrides = overrides or {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = overrides.get(f.name, f.default if f.default is not dataclasses.MISSING
                                else f.default_factory())
        help_text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        kind, many = _arg_type(f)
        if kind == "bool":
            parser.add_argument(flag, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, default=default, help=help_text, choices=choices,
                                type=_PARSERS.get(kind, str), nargs="+" if many else None,
                                action=_ListAction if many else "store",
                                metavar=None if choices else kind.upper())
    args = parser.parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def check_finite(s):
    """A `UserError` for the first float setting of `s` that is NaN or infinite."""
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def check_rules(s, rules):
    """A `UserError` for the first setting of `s` (None: not given) that fails its rule
    ({field: (test, what it must be in words)}, e.g. `echoes.sampler.SAMPLING_RULES`)."""
    for name, (ok, what) in rules.items():
        value = getattr(s, name)
        if value is not None and not ok(value):
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {value}")


def check_at_least(s, minimums):
    """A `UserError` for the first setting of `s` below its minimum ({field: minimum}; NaN is
    below every minimum), or infinite."""
    for name, low in minimums.items():
        value = getattr(s, name)
        if not value >= low or value == math.inf:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def device_name(device):
    """What a run's numbers were measured on: the GPU's name, or the CPU's model and the threads
    torch uses ("Intel(R) Xeon(R) Platinum 8480+, 2 threads")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()  # only the architecture on Linux
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def pick_device(name, flag="--device"):
    """A --device setting as a torch.device: auto = the GPU when there is one, else cpu; cpu,
    cuda or cuda:N; a GPU asked for but missing, or another name, is a `UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name!r} is not a device this runs on: use auto, cpu, cuda "
                        "or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: no CUDA GPU is available here; use {flag} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA "
                        "GPU(s); use cuda:0 or cuda")
    return device


# -----------------------------------------------------------------------------
# checkpoint files


# training libraries whose bookkeeping objects ride along in released checkpoints (Lightning's
# "callbacks" dict is keyed by its callback classes; hyper-parameters may be OmegaConf objects,
# which also name typing and builtins types): they are loaded as inert stand-ins, so neither the
# library nor full unpickling is needed
BOOKKEEPING = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf")
BOOKKEEPING_TYPES = ("typing", "builtins")  # stood in for only beside a BOOKKEEPING name


class Bookkeeping:
    """An inert stand-in for a class of a training library's bookkeeping (see BOOKKEEPING): it
    keeps whatever the pickle gives it and runs no code."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _standable(names):
    """Whether every one of these globals may be stood in for (see BOOKKEEPING)."""
    return {name.split(".")[0] for name in names} <= set(BOOKKEEPING + BOOKKEEPING_TYPES)


def _all_bookkeeping(names):
    """Whether the globals a checkpoint needs beyond torch's safe ones are all bookkeeping: all
    standable, with a library's among them (typing and builtins names alone are not)."""
    roots = {name.split(".")[0] for name in names}
    return bool(roots & set(BOOKKEEPING)) and _standable(names)


def _stand_in(name):
    module, _, cls = name.rpartition(".")  # the name the pickle looks it up by
    return type(cls, (Bookkeeping,), {"__module__": module, "__qualname__": cls})


def _load_with_globals(path, stand_ins):
    """torch.load(weights_only=True) with the stand-ins allowed, on a torch without the
    safe_globals context (2.4): they are added process-wide and taken out again after, where
    torch can list them (else they stay, inert)."""
    saved = (torch.serialization.get_safe_globals()
             if hasattr(torch.serialization, "get_safe_globals") else None)
    torch.serialization.add_safe_globals(stand_ins)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    finally:
        if saved is not None:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(saved)


def _load_weights_only(path):
    """torch.load(weights_only=True), with stand-ins for the globals it needs when they are all
    bookkeeping (found at once where torch can list them, else one refusal at a time: typing
    and builtins names met before the library's are stood in for meanwhile, and the load counts
    only once the library's name is among them)."""
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # torch < 2.5, or not a zip checkpoint
        names = set()
    while True:
        stand_ins = [_stand_in(n) for n in sorted(names)] if _standable(names) else []
        try:
            if hasattr(torch.serialization, "safe_globals"):
                with torch.serialization.safe_globals(stand_ins):
                    out = torch.load(path, map_location="cpu", weights_only=True)
            else:
                out = _load_with_globals(path, stand_ins)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            name = found.group(1) if found else ""
            if name and "." not in name:  # torch names builtins without their module
                name = "builtins." + name
            if not name or name in names or len(names) >= 64:
                raise
            names.add(name)
            if not _standable(names):
                raise
            continue
        if names and not _all_bookkeeping(names):  # typing / builtins names and nothing else
            raise pickle.UnpicklingError(f"weights-only load needs GLOBAL {sorted(names)[0]}")
        return out


def check_finite_weights(state_dict, what):
    """A `UserError` naming the first floating tensor of `state_dict` that holds nan or inf: a
    damaged file, or a run that diverged, would otherwise give noise or black pictures."""
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
            raise UserError(f"{what} holds nan or inf weights ({key}); it is damaged or its run "
                            "diverged: use an earlier checkpoint or re-create it")


def _abbrev(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state_strict(module, state_dict, what, path):
    """`load_state_dict(strict=True)` whose failure is one line naming the missing, unexpected and
    mis-shaped keys (abbreviated), or the first tensor holding nan or inf."""
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        held = (f"it holds {', '.join(map(str, list(state_dict)[:4]))}"
                if isinstance(state_dict, dict) else f"it holds a {type(state_dict).__name__}")
        raise UserError(f"{what} {path} does not hold a state dict of tensors ({held}); check "
                        f"that the file is a {what}")
    own = module.state_dict()
    missing, unexpected = set(own) - set(state_dict), set(state_dict) - set(own)
    shape = {k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape}
    if missing or unexpected or shape:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape for", shape))
        parts = [f"{name} {len(ks)} keys ({_abbrev(ks)})" for name, ks in found if ks]
        raise UserError(f"{what} {path} does not match the model configuration: "
                        + "; ".join(parts) + "; check the file and the model options")
    check_finite_weights(state_dict, f"{what} {path}")
    module.load_state_dict(state_dict, strict=True)
    return module


def check_file(path, what, fix="check the path", empty=None):
    """A `UserError` unless `path` is a regular file: a folder, a device or a missing path is
    named as such, with `fix` for the missing one; with `empty` (its fix), a file of 0 bytes
    too."""
    if os.path.isfile(path):
        if empty is not None and os.path.getsize(path) == 0:
            raise UserError(f"{what} {path} is empty (0 bytes); {empty}")
        return
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a file; give the file")
    if os.path.exists(path):
        raise UserError(f"{what} {path} is not a regular file; give a file")
    raise UserError(f"{what} not found: {path} ({fix})")


def check_zip_checksums(path, what):
    """A `UserError` when a member of torch's zip format fails its CRC-32 (a read of the whole
    file, about 3 GB/s from the page cache). Members stored without one (CRC 0: torch >= 2.6
    can save so) are not checked; a file that is no whole zip is left to torch.load, whose
    errors name what is wrong with it."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error):
        return
    with z:
        for info in z.infolist():
            if info.CRC == 0:
                continue
            try:
                with z.open(info) as f:  # zipfile checks the CRC-32 at the member's end
                    while f.read(1 << 20):
                        pass
            except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
                    NotImplementedError, zlib.error) as e:  # RuntimeError: a flipped "encrypted"
                first = (str(e).splitlines() or [type(e).__name__])[0][:80]
                why = "fails its checksum" if "CRC" in first else f"cannot be read: {first}"
                raise UserError(f"{what} {path} is damaged ({info.filename} {why}); "
                                "re-download or re-create it") from e


def load_checkpoint(path, trusted=False, what="checkpoint"):
    """torch.load with safe defaults: `weights_only=True` (training libraries' bookkeeping
    objects come back as inert `Bookkeeping` stand-ins), and a one-line `UserError` for a file
    that is missing, truncated or no PyTorch file, or needs full unpickling (allowed only with
    `trusted=True`, which the scripts expose as `--trust-checkpoints`). The zip's checksums are
    checked first (torch does not check them), so a byte flipped inside a tensor is a damaged
    file, not silently wrong weights; the legacy pickle format has none."""
    path = os.fspath(path)
    check_file(path, what)
    check_zip_checksums(path, what)
    try:
        return _load_weights_only(path)
    except pickle.UnpicklingError as e:
        # bytes that are no pickle at all: full unpickling would not help. Any other refusal of
        # torch's safe unpickler (a class it does not know, a dict subclass it cannot fill)
        # is about what the file holds
        # "unsupported operand N" is one, but for the opcodes of pickle protocols 4 and 5
        # (140-152: FRAME, STACK_GLOBAL, ...), which a checkpoint saved with them holds
        operand = re.search(r"unsupported operand (\d+)", str(e).lower())
        newer = operand is not None and 140 <= int(operand.group(1)) <= 152
        if not newer and any(k in str(e).lower() for k in ("invalid load key", "truncated",
                                                           "unsupported operand")):
            raise UserError(f"{what} {path} is not a readable PyTorch file; "
                            "re-download or re-create it") from e
        if not trusted:
            raise UserError(f"{what} {path} holds objects beyond tensors and plain types; "
                            "if you trust the file, pass --trust-checkpoints") from e
    except Exception as e:  # torn zip, truncated file, random bytes: torch raises many types
        with open(path, "rb") as f:
            head = f.read(4)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor a pickle
            raise UserError(f"{what} {path} is not a PyTorch file (no zip or pickle header); "
                            "re-download or re-create it") from e
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:120]  # its first sentence
        raise UserError(f"{what} {path} is not a readable PyTorch file ({type(e).__name__}: "
                        f"{first}); re-download or re-create it") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a trusted but broken pickle: still one line
        raise UserError(f"{what} {path} could not be unpickled ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from e


def write_atomic(path, write, replace=True):
    """Call `write(f)` on a temp file in `path`'s folder, fsync, then rename it over `path`:
    readers see the old file or the complete new one, never a torn write; the temp file is
    removed when anything fails. With `replace=False` an existing `path` is never replaced:
    the file is published with a hard link, which fails with FileExistsError when `path`
    exists (also when another process creates it in the meantime). A write the file system
    refuses (no space, a quota, no permission) is a `UserError` that says an existing `path`
    is kept."""
    path = os.fspath(path)
    if os.path.islink(path) and replace:  # written through the link, as open() would
        path = os.path.realpath(path)
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder; choose a file name")
    folder = os.path.dirname(os.path.abspath(path))
    tmp, publishing = None, False
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX)
        # locked until it is published: `remove_temps(dead_only=True)` leaves it alone
        with os.fdopen(fd, "wb") as f:
            _lock(fd)
            write(f)
            f.flush()
            os.fsync(fd)
            try:  # mkstemp makes it 0600: the replaced file's mode, else the one open() gives
                mode = (os.stat(path).st_mode & 0o7777 if replace and os.path.exists(path)
                        else 0o666 & ~_umask())
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, mode)
                else:  # Windows before Python 3.13
                    os.chmod(tmp, mode)
            except OSError:  # a file system without modes (FAT, some network mounts)
                pass
            publishing = True
            if replace:
                os.replace(tmp, path)
            else:
                _publish_new(tmp, path)
    except (OSError, RuntimeError) as e:
        if publishing and isinstance(e, FileExistsError):  # `path` exists: the caller's case
            raise
        # torch.save reports a failed write as a RuntimeError ("unexpected pos") whose context
        # is the OSError; a RuntimeError without one is the caller's
        cause = _os_error(e)
        # no errno: the caller's own error (a format PIL cannot write, say), but for a short
        # write (numpy's "N requested and M written"), a full disk's mark
        short = cause is not None and cause.errno is None and "requested and" in str(cause)
        if cause is None or (cause.errno is None and not short):
            raise
        fix = ("free some space or choose another output folder"
               if short or cause.errno in (errno.ENOSPC, errno.EDQUOT)
               else "check the folder or choose another output folder")
        kept = "; the existing file is kept" if os.path.exists(path) else ""
        raise UserError(f"cannot write {path} ({cause.strerror or cause}); {fix}{kept}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _os_error(e):
    """The OSError that `e` is or was raised from (its cause or context chain), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def check_writable(folder, flag="--out"):
    """Make `folder` and check that files can be written there, or a `UserError` naming `flag`:
    before the work whose results would go there."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is not a folder; give a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there ({e.strerror or e}); choose another "
                        "folder") from e


def check_out_file(path, flag="--out"):
    """Check up front that a results file can be written at `path` (its folder is made)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    check_writable(os.path.dirname(os.path.abspath(path)), flag)


def write_text(path, text):
    """`text` to the file `path` in UTF-8, atomically (see `write_atomic`); a file name in it
    that is not UTF-8 (Python's surrogate escapes) is written as its own bytes."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


def _lock(fd):
    """Take an exclusive lock on an open file without waiting; False when another process holds
    one, or where locks are unsupported (no fcntl, some network file systems)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def folder_lock(folder, what):
    """Hold an exclusive lock on `folder` (on its file LOCK_NAME) while the block runs, so that
    two runs never write one folder at once; a `UserError` when another process holds it. Where
    the file system has no locks (no fcntl, some network file systems) the block runs unguarded."""
    path = os.path.join(folder, LOCK_NAME)
    try:  # read-only: a lock file another user made (0644 in a shared folder) still opens
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot open the lock file {path} ({e.strerror}); check the folder's "
                        "permissions or use another folder") from e
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{folder} is being written by another {what}; wait for it to "
                                "end or use another folder") from None
            except OSError:  # locks unsupported here
                pass
        yield
    finally:
        os.close(fd)  # releases the lock


LOCK_NAME = ".echoes-lock"
TEMP_PREFIX = ".echoes-tmp-"  # names no user file is likely to have: remove_temps deletes them
TEMP_MIN_AGE_S = 10  # a temp file this new may be one whose writer has not locked it yet


def remove_temps(folder, dead_only=False):
    """Delete the temp files `write_atomic` leaves in `folder` when its process is killed
    mid-write. Call it only where no other writer can be at work in that folder, or with
    `dead_only`: then a temp file goes only when nobody holds its lock (the kernel drops a
    killed writer's lock, on any host of a shared file system that supports locks) and it is
    older than TEMP_MIN_AGE_S; where locks are unsupported nothing goes."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not name.startswith(TEMP_PREFIX) or not os.path.isfile(path) or os.path.islink(path):
            continue
        if dead_only:
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:  # gone, or not ours to open
                continue
            try:
                if time.time() - os.fstat(fd).st_mtime < TEMP_MIN_AGE_S or not _lock(fd):
                    continue
                _remove(path)
            finally:
                os.close(fd)
        else:
            _remove(path)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:  # another run removed it first
        pass


@functools.lru_cache(maxsize=None)
def _umask():
    """The process's umask, read once, at the first atomic write rather than at import: Linux
    shows it in /proc; elsewhere reading it means setting it for a moment."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def _publish_new(tmp, path):
    """Give the finished file `tmp` the name `path` only if no file has it (FileExistsError
    otherwise); `tmp` stays for the caller to remove."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        try:
            os.replace(tmp, path)
        except BaseException:
            os.remove(path)  # our empty claim: never leave it to block the name
            raise


def save_atomic(obj, path):
    """torch.save through `write_atomic`."""
    write_atomic(path, lambda f: torch.save(obj, f))

"""The output folder of a run or a tool: who holds it, what llmft wrote there, and what an overwrite may remove.

Rules every entry (finetune.py, merge, quantize) follows, and the functions that keep them:
- An output folder never is, contains or lies inside one of the command's inputs (model, adapter, its base, data
  files, config files), symlinks resolved: `inputs_overlap_problems`, checked with the other settings before anything
  loads. Writing a result there, let alone replacing what was there, would destroy what the command reads.
- One process at a time writes into an output folder: `locked_output_dir` takes an exclusive lock (flock, released
  by the kernel when the process ends, however it ends) and a second run or tool on the same folder stops at once
  with a message naming the process that holds it.
- Every top-level name llmft creates in an output folder (checkpoint-N, the final save's files, the run's records,
  TensorBoard's runs/) is recorded in WRITTEN_FILE before it is created (`record_written`). `--overwrite_output_dir`
  removes those names and nothing else (`replace_previous_run`): never a match on file names, so a data file called
  model_train.json or a folder called runs/ that a run did not write stays where it is.
- Nothing llmft does to files here follows a symbolic link: removal unlinks a link itself, `follow_umask` changes the
  modes of the regular files and folders it reaches without going through one.

Tools write their result through `staged_output_dir`: into a hidden sibling folder that becomes the output only once
complete, so an interrupted merge or quantization (Ctrl-C, or a SIGTERM from a scheduler) never leaves a folder that
looks finished, nor a partial one behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from llmft.errors import LlmftError

if TYPE_CHECKING:
    from llmft.args import DataArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)

LOCK_FILE = ".llmft.lock"
WRITTEN_FILE = "llmft_written.json"
# llmft's own bookkeeping in an output folder: never counted as a result, never listed as written
BOOKKEEPING = frozenset({LOCK_FILE, WRITTEN_FILE, WRITTEN_FILE + ".tmp"})

# What a run may write at the top of its output folder (the final save, the Trainer's summaries, PEFT's model card,
# the run's records). Used only to refuse an overwrite: a folder holding one of these that no llmft run recorded
# writing (an earlier version's run, or a file of the user's) is neither cleared by name, since the name alone cannot
# say whose it is, nor trained over, since the final save would replace it or the result would mix with it.
RESULT_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "README.md",
        "llmft_run.json",
        "llmft_run_settings.json",
        "training_args.bin",
        "trainer_state.json",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
        "training_report.json",
        "training_report.png",
    }
)
RESULT_PREFIXES = ("checkpoint-", "model-0", "pytorch_model-0", ".llmft-saving")


# ---------------------------------------------------------------- inputs and outputs apart


def inputs_overlap_problems(
    output_dir: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], flag: str = "--output_dir"
) -> list[str]:
    """Why `output_dir` may not take this command's results: for each input (`{flag or description: path}`, None
    skipped) that the output folder is, contains, or lies inside, one message naming both. Paths are compared with
    symlinks resolved, a Hub id as its snapshot in the local cache, and a folder input also as the targets of the
    links in it (a Hub snapshot's files are links into the cache's blobs)."""
    output = os.path.realpath(output_dir)
    problems = []
    for what, path in inputs.items():
        if path is None or str(path) == "":
            continue
        for resolved, itself in _resolved_input(str(path)):
            relation = _relation(output, resolved)
            if relation is not None and (itself or relation != "lies inside"):
                problems.append(
                    f"{flag} {output_dir} {relation} {what} {path}: a command's output folder must be apart from "
                    "its inputs (writing or overwriting there would destroy them); choose another folder"
                )
                break
    return problems


def _resolved_input(path: str) -> list[tuple[str, bool]]:
    """The real paths an input stands for (see `inputs_overlap_problems`), each with whether it is the input itself
    (True) or the target of a link in it (False: an output inside such a target, which could be any folder, is
    allowed)."""
    if not os.path.exists(path):
        from llmft.model_folder import model_folder

        folder = model_folder(path).folder  # a Hub id in the local cache; None for anything else
        if folder is None:
            return []
        path = str(folder)
    resolved = [(os.path.realpath(path), True)]
    if os.path.isdir(path):
        with contextlib.suppress(OSError), os.scandir(path) as entries:
            resolved += [(os.path.realpath(e.path), False) for e in entries if e.is_symlink()]
    return resolved


def _relation(output: str, source: str) -> str | None:
    if output == source:
        return "is"
    if _is_inside(source, output):
        return "contains"
    if _is_inside(output, source):
        return "lies inside"
    return None


def _is_inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def training_inputs(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, config_file: str | None
) -> dict[str, str | None]:
    """finetune.py's inputs by flag, for `inputs_overlap_problems`: the model, the data, and every settings file."""
    inputs = {
        "--model_name_or_path": model_args.model_name_or_path,
        "--data_path": data_args.data_path,
        "--eval_data_path": data_args.eval_data_path,
        "the config file": config_file,
    }
    for flag, value in (
        ("--chat_template", model_args.chat_template),
        ("--deepspeed", training_args.deepspeed),
        ("--fsdp_config", training_args.fsdp_config),
    ):
        if isinstance(value, str) and os.path.isfile(value):
            inputs[flag] = value
    return inputs


def output_dir_problems(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, config_file: str | None
) -> list[str]:
    """What keeps a training run from writing into --output_dir, for the settings checks: an input there
    (`inputs_overlap_problems`), or, with --overwrite_output_dir, a previous result it may not remove
    (`overwrite_problems`)."""
    out = training_args.output_dir
    problems = inputs_overlap_problems(out, training_inputs(model_args, data_args, training_args, config_file))
    if not problems and training_args.overwrite_output_dir:
        problems += overwrite_problems(out)
    return problems


# ---------------------------------------------------------------- one process at a time


class _FolderLock:
    """An exclusive flock on `path`, a file llmft creates for it; its text says who holds it (for the message the
    next process gets). The file is removed on release, and a lock won on a file that was removed meanwhile is
    taken again on the new one, so two processes can never both believe they hold it."""

    def __init__(self, path: str, describe: str) -> None:
        self.path, self.describe = path, describe
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:  # never through a link: the lock file is llmft's own, in the folder itself
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise LlmftError(f"{self.describe}: cannot create the lock file {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise LlmftError(f"{self.describe}: cannot lock {self.path}: {e.strerror}") from None
                raise LlmftError(
                    f"{self.describe} is in use by another llmft process ({holder}); wait until it ends, or "
                    "choose another folder"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released it and removed the file between our open and our lock
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300],
        }
        with contextlib.suppress(OSError):  # who holds it is for the message only; a full disk must not stop here
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
        self.fd = fd
        _HELD.add(self)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)  # while still held: a waiting process then retries on a new file
        os.close(self.fd)
        self.fd = None
        _HELD.discard(self)


_HELD: set[_FolderLock] = set()


def release_held_locks() -> None:
    """Release every output folder lock this process holds, for a signal handler about to end the process without
    unwinding (a kill -9 leaves the lock file behind, unlocked: the next process takes it over)."""
    for lock in list(_HELD):
        lock.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "its lock file does not say which"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}: " + str(
        holder.get("command", "?")
    )


@contextlib.contextmanager
def locked_output_dir(
    output_dir: str | os.PathLike, *, flag: str = "--output_dir", staged: bool = False
) -> Iterator[None]:
    """Hold `output_dir` exclusively while the block runs (see the module docstring); a LlmftError naming the holder
    when another process has it. A run locks LOCK_FILE inside the folder (created for it, and removed again with the
    folder when the run leaves nothing else there). A tool (`staged`), whose result replaces the whole folder, locks
    a hidden sibling instead, and the folder's own LOCK_FILE too while the folder exists, so that no run is writing
    into what it replaces."""
    output = Path(output_dir)
    describe = f"{flag} {output}"
    locks = []
    created = False
    try:
        if staged:
            output.parent.mkdir(parents=True, exist_ok=True)
            locks.append(_FolderLock(str(output.parent / f".{output.name}{LOCK_FILE}"), describe))
            locks[-1].acquire()
            if output.is_dir() and not output.is_symlink():
                locks.append(_FolderLock(str(output / LOCK_FILE), describe))
                locks[-1].acquire()
        else:
            created = not output.exists()
            output.mkdir(parents=True, exist_ok=True)
            locks.append(_FolderLock(str(output / LOCK_FILE), describe))
            locks[-1].acquire()
        yield
    finally:
        for lock in reversed(locks):
            lock.release()
        if created:
            _remove_if_unused(output)


def _remove_if_unused(folder: Path) -> None:
    """Remove `folder`, which a run created, when it holds only llmft's bookkeeping: a run stopped before it wrote
    anything leaves the file system as it found it."""
    with contextlib.suppress(OSError):
        if set(os.listdir(folder)) <= BOOKKEEPING:
            for name in BOOKKEEPING:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()


def lock_run_output_dir(training_args: TrainingArguments) -> contextlib.AbstractContextManager:
    """`locked_output_dir` for a training run, held by its first process only (the others write where it says)."""
    if training_args.process_index != 0:
        return contextlib.nullcontext()
    return locked_output_dir(training_args.output_dir)


# ---------------------------------------------------------------- what llmft wrote


def written_names(output_dir: str | os.PathLike) -> set[str]:
    """The top-level names WRITTEN_FILE records as written by llmft into `output_dir` (empty when there is none or it
    does not parse). Only single plain names are taken: a record naming `..` or a path cannot point elsewhere."""
    try:
        with open(os.path.join(output_dir, WRITTEN_FILE), encoding="utf-8") as f:
            names = json.load(f).get("written", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and _plain_name(n)}


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name and "\0" not in name


def record_written(output_dir: str | os.PathLike, *names: str) -> None:
    """Add `names` (top-level entries of `output_dir`) to its record of what llmft wrote; call it before creating
    them, so that a process killed halfway leaves nothing of its own unrecorded. Written whole (a temporary file
    renamed over it)."""
    new = {n for n in names if _plain_name(n)} - BOOKKEEPING
    recorded = written_names(output_dir)
    if new <= recorded:
        return
    _write_record(output_dir, recorded | new)


def _write_record(output_dir: str | os.PathLike, names: Iterable[str]) -> None:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, WRITTEN_FILE)
    partial = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)  # left by a process killed while writing it; a link there goes, not what it points to
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump({"written": sorted(names)}, f, indent=1)
    os.replace(partial, path)


def foreign_names(output_dir: str | os.PathLike) -> list[str]:
    """The entries of `output_dir` that llmft did not record writing, sorted ([] when it does not exist)."""
    try:
        present = set(os.listdir(output_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(present - BOOKKEEPING - written_names(output_dir))


def overwrite_problems(output_dir: str | os.PathLike, flag: str = "--output_dir", *, whole: bool = False) -> list[str]:
    """Why `--overwrite_output_dir` may not replace what `output_dir` holds: entries llmft did not record writing
    that look like a run's results (see RESULT_NAMES), or with `whole` (a tool's result replaces the whole folder)
    any entry llmft did not record writing. Other entries a run leaves where they are."""
    foreign = foreign_names(output_dir)
    if not whole:
        foreign = [n for n in foreign if n in RESULT_NAMES or n.startswith(RESULT_PREFIXES)]
    if not foreign:
        return []
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    why = (
        "a tool's result replaces the whole folder"
        if whole
        else "this run would replace them or mix its result with them, and their names cannot say they are a run's"
    )
    return [
        f"{flag} {output_dir} holds {shown}, which no llmft run or tool recorded writing there ({WRITTEN_FILE}); "
        f"--overwrite_output_dir removes only what llmft recorded, and {why}: move them away yourself, or choose "
        "another folder"
    ]


def remove_entry(folder: str | os.PathLike, name: str) -> None:
    """Remove `folder/name` without following a symbolic link: a link is unlinked, a folder removed with what is in
    it (shutil.rmtree never follows the links inside), anything else unlinked."""
    path = os.path.join(folder, name)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def clear_previous_run(output_dir: str) -> list[str]:
    """Remove what llmft recorded writing in output_dir (checkpoints, weights, configs, logs) and reset the record;
    returns the names removed. Nothing else in the folder is touched."""
    removed = sorted(n for n in written_names(output_dir) if os.path.lexists(os.path.join(output_dir, n)))
    for name in removed:
        remove_entry(output_dir, name)
    if os.path.lexists(os.path.join(output_dir, WRITTEN_FILE)):
        _write_record(output_dir, [])
    return removed


def replace_previous_run(training_args: TrainingArguments) -> None:
    """--overwrite_output_dir: rank 0 removes what a previous run recorded writing in output_dir before this run
    writes there, so that neither resume nor a reload can mix the two runs; the log lists what went."""
    with training_args.main_process_first(local=False, desc="replacing the previous run"):
        if training_args.process_index == 0:
            removed = clear_previous_run(training_args.output_dir)
            if removed:
                logger.warning(
                    "--overwrite_output_dir: replacing the previous run in %s (removed %s)",
                    training_args.output_dir,
                    ", ".join(removed),
                )


# ---------------------------------------------------------------- a full disk

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_MESSAGES = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# torch.save's C++ writer loses the errno and reports only where its stream stopped (`unexpected pos`, `file write
# failed`): taken as a full disk when the folder's file system has less than this left
NEARLY_FULL_BYTES = 64 * 1024 * 1024


RESUME_ADVICE = (
    "the save cut short is incomplete and is never resumed from, earlier checkpoints are whole: free some space and "
    "run again with --resume_from_checkpoint True"
)


@contextlib.contextmanager
def disk_full_is_user_error(
    output_dir: str | os.PathLike, flag: str = "--output_dir", advice: str = RESUME_ADVICE
) -> Iterator[None]:
    """Turn a write that failed because the disk (or the user's quota) is full into a LlmftError that says so and
    how to go on (`advice`; a run's: the save cut short is incomplete, resume skips it as
    llmft.saving.checkpoint_problem says, and the earlier checkpoints are whole). Any other error passes through
    unchanged."""
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e, output_dir):
            raise
        where = next((x.filename for x in _chain(e) if getattr(x, "filename", None)), None)
        raise LlmftError(
            f"the disk of {flag} {output_dir} is full (writing {where or 'a checkpoint or the result'}: {e}); {advice}"
        ) from None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_disk_full(error: BaseException, output_dir: str | os.PathLike) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(m in str(e).lower() for m in DISK_FULL_MESSAGES):
            return True
    if isinstance(error, RuntimeError) and any(m in str(error) for m in ("unexpected pos", "file write failed")):
        try:
            status = os.statvfs(output_dir)
        except OSError:
            return False
        return status.f_bavail * status.f_frsize < NEARLY_FULL_BYTES
    return False


# ---------------------------------------------------------------- file modes


def follow_umask(path: str | os.PathLike) -> None:
    """Give `path` (a folder, recursively, or a file) the modes a plain open() or mkdir() would: 0666 / 0777 less
    the umask. Used on what llmft itself just wrote: safetensors creates its files 0600 and tempfile.mkdtemp its
    folders 0700, which would keep a result from the rest of a team on shared storage. Symbolic links are neither
    changed nor followed (`path` itself included): each file or folder is opened without following a link and its
    mode set through that descriptor, so a link swapped in meanwhile changes nothing outside."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {stat.S_IFREG: 0o666 & ~umask, stat.S_IFDIR: 0o777 & ~umask}
    path = os.fspath(path)
    if not _set_mode(path, modes) or not os.path.isdir(path):
        return
    for root, dirs, files in os.walk(path):  # never descends through a link to a folder
        for name in dirs + files:
            _set_mode(os.path.join(root, name), modes)


def _set_mode(path: str, modes: dict[int, int]) -> bool:
    """Set a regular file's or folder's mode from `modes` (by file type); False for a link or anything else."""
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
        if kind not in modes:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        status = os.fstat(fd)
        kind = stat.S_IFMT(status.st_mode)
        if kind in modes and status.st_mode & 0o777 != modes[kind]:
            os.fchmod(fd, modes[kind])
        return kind in modes
    finally:
        os.close(fd)


# ---------------------------------------------------------------- tools: staged results


def check_output_dir(
    output_dir: str | Path,
    *,
    force: bool,
    flag: str = "--output_dir",
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> None:
    """Fail before any work when `output_dir` cannot take a tool's result: a file, a folder apart from none of the
    tool's inputs (`inputs_overlap_problems`), a non-empty folder without --overwrite_output_dir, or one holding
    entries no llmft command recorded writing (`overwrite_problems`: the result replaces the whole folder)."""
    output = Path(output_dir)
    if output.is_symlink():  # replacing it would replace the link, and the result would land beside its target
        raise LlmftError(f"{flag} {output} is a symbolic link: give the folder it points to, or a new folder")
    if output.exists() and not output.is_dir():
        raise LlmftError(f"{flag} {output} exists and is not a folder")
    problems = inputs_overlap_problems(output, inputs or {}, flag)
    if problems:
        raise LlmftError(problems[0])
    if output.is_dir() and set(os.listdir(output)) - BOOKKEEPING:
        if not force:
            raise LlmftError(
                f"{flag} {output} is not empty: choose a new folder, or pass --overwrite_output_dir True to replace it"
            )
        if problems := overwrite_problems(output, flag, whole=True):
            raise LlmftError(problems[0])


class Terminated(SystemExit):
    """Raised in the main thread when a SIGTERM arrives while a result is being written, so that the partial
    folder is removed on the way out; exits with the status a shell gives a process killed by SIGTERM."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_as(action: Callable[[int, FrameType | None], object]) -> Iterator[None]:
    """Call `action(signum, frame)` on SIGTERM inside the block (main thread only: elsewhere signals cannot be
    handled, and the block runs unprotected), restoring the previous handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, action)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated()


@contextlib.contextmanager
def staged_output_dir(
    output_dir: str | Path,
    *,
    force: bool,
    flag: str = "--output_dir",
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> Iterator[Path]:
    """Yield an empty hidden sibling of `output_dir` to write a result into; when the block completes it becomes
    `output_dir` (with `force`, replacing what llmft wrote there only then), its files readable as the umask allows
    and recorded in WRITTEN_FILE. The output folder is locked throughout (`locked_output_dir`). On any error, an
    interrupt or a SIGTERM, the partial folder is removed and `output_dir` is left as it was; a SIGTERM during the
    final swap waits for the swap to finish."""
    output = Path(output_dir)
    check_output_dir(output, force=force, flag=flag, inputs=inputs)
    with locked_output_dir(output, flag=flag, staged=True):
        with _sigterm_as(_raise_terminated):
            staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
            try:
                follow_umask(staging)  # mkdtemp makes it private; the result should read like any new folder
                with disk_full_is_user_error(output, flag, f"nothing was written to {output}: free some space"):
                    yield staging
                follow_umask(staging)  # safetensors writes its files 0600
                _write_record(staging, os.listdir(staging))
                check_output_dir(output, force=force, flag=flag)  # nothing foreign arrived while it was written
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        deferred = []
        with _sigterm_as(lambda signum, frame: deferred.append(signum)):
            if output.exists():
                replaced = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
                os.replace(output, replaced / output.name)
                os.replace(staging, output)
                shutil.rmtree(replaced)
            else:
                os.replace(staging, output)
    if deferred:
        raise Terminated()

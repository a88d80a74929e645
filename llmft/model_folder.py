"""What a model path or Hub id is: the one place that reads a checkpoint's config files and answers for everyone.

`model_folder(name)` answers, as a frozen `ModelFolder`, what `name` holds: a full model folder (config.json), a
PEFT adapter (adapter_config.json, with the base it records), the quantization it is stored in (`quant_method`: gptq,
bitsandbytes, awq, ... or None), its vocabulary size and the embedding rows an adapter saved, whether it has a
tokenizer, which classes it maps to its own Python code (`auto_map`), and whether its safetensors files are whole. It
is built once per folder: a second call for the same folder, its files unchanged, reads nothing again (the memo is
keyed on the folder's path and the size and modification time of its files, so a folder rewritten meanwhile is read
anew; a rewrite to the same size within the file system's timestamp resolution would go unseen, which is what
`clear_cache` is for).

Where a name points, one rule for finetune.py and every tool (`_locate`):
- an existing directory is a local folder; an existing file is "not a directory";
- a name shaped like a path (absolute, starting with `.` or `~`, or of more than the two `org/name` parts of a Hub id)
  that does not exist is "no such directory";
- anything else must be a valid Hub id, one part (`gpt2`) or two (`Qwen/Qwen2.5-0.5B-Instruct`), as the Hub takes
  both; with HF_HUB_OFFLINE set it must be in the local Hugging Face cache, whose snapshot is then read as a local
  folder. Online, a Hub id not in the cache is taken on trust: from_pretrained fetches it, or says why not.

`ModelFolder.problems(...)` and `require_model(...)` turn the answers into messages that name the flag (or where the
path came from) and the path, as finetune.py lists them among its settings problems and the tools raise them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llmft.errors import ConfigError, LlmftError

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Configs whose `auto_map` names classes in the model's own Python files (AutoConfig, AutoModelForCausalLM, ...).
REMOTE_CODE_CONFIGS = (CONFIG, TOKENIZER_CONFIG)
TRUST_REMOTE_CODE_FLAG = "--trust_remote_code True"
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header

NO_SUCH_DIRECTORY = "no such directory"
NOT_A_HUB_ID = "no such directory, and not a valid Hub model id"
NOT_CACHED_OFFLINE = "no such directory, and no Hub model of that name in the local cache (HF_HUB_OFFLINE is set)"


class FolderError(ConfigError):
    """A model path or Hub id that cannot be used; each problem names the flag and the path. One problem reads as
    itself (`error: --base /x: no such directory`), several as a settings list."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        if len(self.problems) == 1:
            self.args = (self.problems[0],)


@dataclass(frozen=True)
class ModelFolder:
    """What a model path or Hub id holds, read once (see the module docstring). Mappings are read-only views."""

    name: str  # as the caller gave it
    folder: Path | None  # the local folder read: the path itself, or a Hub id's cached snapshot; None when not local
    is_hub_id: bool
    missing: str | None  # why nothing can be read there ("no such directory", ...); None when it can
    config: Mapping[str, Any] | None  # config.json
    adapter_config: Mapping[str, Any] | None  # adapter_config.json (a PEFT adapter)
    has_tokenizer: bool  # tokenizer_config.json is there
    remote_code: tuple[str, ...]  # `file: Auto class -> module.Class` entries of the configs' auto_map
    unreadable: tuple[str, ...]  # config files that are there but do not parse
    weight_problems: tuple[str, ...]  # why a *.safetensors file is not whole, one line per file
    adapter_shapes: Mapping[str, tuple[int, ...]]  # tensor shapes in adapter_model.safetensors, from its header

    @property
    def is_model(self) -> bool:
        return self.config is not None

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None

    @property
    def adapter_base(self) -> str | None:
        """The base model an adapter was trained on, as its adapter_config.json records it."""
        base = (self.adapter_config or {}).get("base_model_name_or_path")
        return str(base) if base else None

    @property
    def quant_method(self) -> str | None:
        """How the checkpoint is stored quantized (gptq, bitsandbytes, awq, ...); None for plain weights or unknown."""
        return quant_method(self.config)

    @property
    def vocab_size(self) -> int | None:
        size = (self.config or {}).get("vocab_size")
        return size if isinstance(size, int) else None

    def saved_embedding_rows(self, module_names: Iterable[str]) -> int | None:
        """Rows an adapter saved in full for the modules named (the model's input embeddings and output head, as
        `llmft.model.embedding_module_names` asks the model): the size training grew the vocabulary to (padded to a
        multiple of 64), not the tokenizer's length. None when the adapter saved none of them."""
        names = set(module_names)
        rows = [
            shape[0]
            for key, shape in self.adapter_shapes.items()
            if "lora_" not in key and key.endswith(".weight") and len(shape) == 2 and key.rsplit(".", 2)[-2] in names
        ]
        return max(rows) if rows else None

    def remote_code_problem(self, what: str, *, trust_remote_code: bool) -> str | None:
        """Why this may not load without `--trust_remote_code True`, or None when it may."""
        if trust_remote_code or not self.remote_code:
            return None
        refs = self.remote_code
        shown = ", ".join(refs[:3]) + (f" and {len(refs) - 3} more" if len(refs) > 3 else "")
        return (
            f"{what} {self.name} ships its own Python code ({shown}), which would run when the model loads: "
            f"llmft runs it only with {TRUST_REMOTE_CODE_FLAG}; pass that if you trust this model's code"
        )

    def problems(
        self, what: str = "--model_name_or_path", *, trust_remote_code: bool = False, adapter: bool = False
    ) -> list[str]:
        """Every reason this cannot be loaded as a model (or, with `adapter`, as a PEFT adapter too), each naming
        `what` and the path; empty when it can. Online, a Hub id not in the cache has none: loading fetches it."""
        where = f"{what} {self.name}"
        if self.missing is not None:
            return [f"{where}: {self.missing}"]
        if self.unreadable:
            return [f"{where}: {problem}" for problem in self.unreadable]
        found = []
        if self.folder is not None and not self.is_model and not (adapter and self.is_adapter):
            if self.is_adapter and not adapter:
                base = self.adapter_base or "the model it was trained on"
                found.append(
                    f"{where}: the directory holds a PEFT adapter ({ADAPTER_CONFIG}), not a model: give its "
                    f"base ({base}), or merge the adapter into it first (llmft merge)"
                )
            elif adapter:
                found.append(
                    f"{where}: the directory holds no model (no {CONFIG}) and no adapter (no {ADAPTER_CONFIG})"
                )
            else:
                found.append(f"{where}: the directory holds no model (no {CONFIG})")
        found += [f"{where}: {problem}" for problem in self.weight_problems]
        if (remote := self.remote_code_problem(what, trust_remote_code=trust_remote_code)) is not None:
            found.append(remote)
        return found


def quant_method(config: Mapping | Any | None) -> str | None:
    """`quant_method` of a config (config.json as a mapping, or a loaded model's PretrainedConfig), lower case; None
    when the weights are not stored quantized."""
    if config is None:
        return None
    quantization = (
        config.get("quantization_config")
        if isinstance(config, Mapping)
        else getattr(config, "quantization_config", None)
    )
    if isinstance(quantization, Mapping):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    return str(method).lower() if method else None


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a path, never a Hub id: absolute, starting with `.` or `~`, or not of the shape
    `name` or `org/name`."""
    parts = name.split("/")
    return len(parts) > 2 or not all(parts) or name.startswith((".", "~"))


def model_folder(name: str | os.PathLike) -> ModelFolder:
    """What `name` (a local path or a Hub id) holds; never raises for what it finds (see `ModelFolder.missing`)."""
    name = str(name)
    located, is_hub_id, missing = _locate(name)
    if located is None:
        return ModelFolder(name, None, is_hub_id, missing, None, None, False, (), (), (), MappingProxyType({}))
    folder = _read_folder(located, is_hub_id, _signature(located))
    return dataclasses.replace(folder, name=name)


def require_model(
    name: str | os.PathLike,
    what: str = "--model_name_or_path",
    *,
    trust_remote_code: bool = False,
    adapter: bool = False,
) -> ModelFolder:
    """`model_folder(name)`, or a FolderError listing every problem (`ModelFolder.problems`)."""
    folder = model_folder(name)
    problems = folder.problems(what, trust_remote_code=trust_remote_code, adapter=adapter)
    if problems:
        raise FolderError(problems)
    return folder


def require_adapter(
    name: str | os.PathLike, what: str = "--adapter", *, trust_remote_code: bool = False
) -> ModelFolder:
    """A PEFT adapter folder that records its base, or an error naming `what` and the path."""
    folder = require_model(name, what, trust_remote_code=trust_remote_code, adapter=True)
    if not folder.is_adapter:
        raise LlmftError(f"{what} {folder.name}: not a PEFT adapter folder: it has no {ADAPTER_CONFIG}")
    if folder.adapter_base is None:
        raise LlmftError(
            f"{what} {folder.name}: its {ADAPTER_CONFIG} names no base_model_name_or_path: pass the base "
            "model explicitly"
        )
    return folder


def clear_cache() -> None:
    """Forget every folder read (the memo notices changed files by itself; this is for tests that need a cold one)."""
    _read_folder.cache_clear()


# ---------------------------------------------------------------- where a name points


def _locate(name: str) -> tuple[str | None, bool, str | None]:
    """(local folder to read or None, is a Hub id, why nothing can be read)."""
    if os.path.isdir(name):
        return os.path.abspath(name), False, None
    if os.path.exists(name):
        return None, False, "not a directory"
    if looks_like_path(name):
        return None, False, NO_SUCH_DIRECTORY
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None, False, NOT_A_HUB_ID
    for file in (CONFIG, ADAPTER_CONFIG):
        cached = _cached_hub_file(name, file)
        if cached is not None:
            return os.path.dirname(cached), True, None
    return None, True, NOT_CACHED_OFFLINE if constants.HF_HUB_OFFLINE else None


def _cached_hub_file(name: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        path = try_to_load_from_cache(name, filename)
    except HFValidationError:
        return None
    return path if isinstance(path, str) else None  # not a str: cached as absent on the Hub


def _signature(folder: str) -> tuple:
    """What changes when any file `_read_folder` reads is written: the size and modification time of the folder's
    config and weight files (symlinks followed, as a Hub snapshot's are blobs)."""
    entries = []
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                if entry.name.endswith((".json", ".safetensors")):
                    try:
                        stat = entry.stat()
                    except OSError:
                        continue
                    entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
    except OSError:
        pass
    return tuple(sorted(entries))


# ---------------------------------------------------------------- reading a folder


def _read_json(file: str) -> Any:
    """Every config file llmft inspects is parsed here (tests count the reads)."""
    with open(file, encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=128)
def _read_folder(folder: str, is_hub_id: bool, signature: tuple) -> ModelFolder:
    files = {entry[0] for entry in signature}
    configs, unreadable = {}, []
    for name in (CONFIG, ADAPTER_CONFIG, TOKENIZER_CONFIG):
        if name not in files:
            continue
        file = os.path.join(folder, name)
        try:
            value = _read_json(file)
        except (OSError, ValueError) as e:
            unreadable.append(f"cannot read {file}: {e}")
            continue
        if not isinstance(value, dict):
            unreadable.append(f"cannot read {file}: not a JSON object")
            continue
        configs[name] = value
    weight_problems, adapter_shapes = [], {}
    for name in sorted(n for n in files if n.endswith(".safetensors")):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            continue
        header = _safetensors_header(file)
        if isinstance(header, str):
            weight_problems.append(header)
        elif name == ADAPTER_WEIGHTS:
            adapter_shapes = {
                key: tuple(entry.get("shape") or ()) for key, entry in header.items() if key != "__metadata__"
            }
    return ModelFolder(
        name=folder,
        folder=Path(folder),
        is_hub_id=is_hub_id,
        missing=None,
        config=_frozen(configs.get(CONFIG)),
        adapter_config=_frozen(configs.get(ADAPTER_CONFIG)),
        has_tokenizer=TOKENIZER_CONFIG in files,
        remote_code=tuple(_remote_code_references(configs)),
        unreadable=tuple(unreadable),
        weight_problems=tuple(weight_problems),
        adapter_shapes=MappingProxyType(adapter_shapes),
    )


def _frozen(value: dict | None) -> Mapping | None:
    return None if value is None else MappingProxyType(value)


def _remote_code_references(configs: dict[str, dict]) -> list[str]:
    references = []
    for name in REMOTE_CODE_CONFIGS:
        auto_map = (configs.get(name) or {}).get("auto_map") or {}
        if not isinstance(auto_map, dict):
            auto_map = {"auto_map": auto_map}
        for auto_class, targets in auto_map.items():
            for target in targets if isinstance(targets, (list, tuple)) else [targets]:
                if target:
                    references.append(f"{name}: {auto_class} -> {target}")
    return references


def safetensors_header_problem(file: str | os.PathLike) -> str | None:
    """Why `file` is not a whole safetensors file, or None. Reads only the header (an 8-byte little-endian length,
    then that much JSON) and checks that every tensor it lists lies within the file, which catches a truncated
    download or copy and a file that is not safetensors at all, without reading the weights."""
    header = _safetensors_header(file)
    return header if isinstance(header, str) else None


def _safetensors_header(file: str | os.PathLike) -> dict | str:
    """The header of a whole safetensors file, or why the file is not one."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"{file} is not a safetensors file (only {size} bytes)"
            (length,) = struct.unpack("<Q", prefix)
            if length > SAFETENSORS_MAX_HEADER or 8 + length > size:
                return f"{file} is not a readable safetensors file (its header claims {length} bytes of {size})"
            header = json.loads(f.read(length))
    except OSError as e:
        return f"cannot read {file}: {e.strerror or e}"
    except (UnicodeDecodeError, ValueError):
        return f"{file} is not a readable safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{file} is not a readable safetensors file (its header is not a JSON object)"
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{file} is not a readable safetensors file (tensor {name} has no data offsets)"
        if offsets[1] > data:
            return (
                f"{file} is truncated: tensor {name} ends at byte {offsets[1]} of the data, the file holds "
                f"{data}; copy or download it again"
            )
    return header

"""Strict typed configs: dataclass defaults <- YAML diff <- ``dotted.key=value`` overrides.

Every stage describes its options as a ``@dataclass(kw_only=True)`` (nested dataclasses for groups).
A YAML file holds only what differs from the defaults; the command line overrides single keys.
Unknown keys and wrongly typed values raise :class:`ConfigError` naming the key and what is accepted,
instead of silently becoming attributes. Imports nothing heavy (yaml only).
"""
from __future__ import annotations

import dataclasses
import logging
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

log = logging.getLogger("synthvit.config")

__all__ = ["ConfigError", "DuplicateKeyError", "StrictLoader", "load_yaml", "repeated_overrides", "load_config", "apply_overrides", "to_dict", "dump_yaml", "describe", "parse_size",
           "check_min", "check_range", "CONFIG_FILE", "Precision", "InChans", "Decoder"]

CONFIG_FILE = "config.yaml"  # the fully resolved config, in every output folder a stage writes
# Choice types more than one stage offers
Attention = Literal["auto", "sdpa", "math"]  # a ViT's attention kernel (auto: synthvit.training.set_attention)
Precision = Literal["auto", "no", "bf16", "fp16"]  # mixed precision through Accelerate (auto: synthvit.training)
InChans = Literal[1, 3]  # model input channels (3: grayscale replicated)
# The dense decoder of a timm model (models/decoders.py): linear head on the last feature map, DPT over 4 blocks,
# DPT with a 1/2-resolution conv-stem skip
Decoder = Literal["linear", "dpt", "dpt-skip"]


class ConfigError(ValueError):
    """A config key, value or file the user must fix. The message says what is accepted."""


class DuplicateKeyError(ConfigError):
    """A YAML mapping gives one key twice (PyYAML would silently keep the last)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark):
        self.key, self.lines = key, (first.line + 1, second.line + 1)
        super().__init__(f"the key {key!r} is given twice (lines {self.lines[0]} and {self.lines[1]}); keep one")


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a mapping that gives one key twice raises :class:`DuplicateKeyError` (merge keys,
    ``<<: *base``, may still be overridden: that is what they are for)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader refuses it with its own error
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path | None = None, text: str | None = None) -> Any:
    """The YAML document in the file ``path`` (or in ``text``) with :class:`StrictLoader`. A file is read as UTF-8;
    PyYAML also reads one that starts with a UTF-16 or UTF-8 byte-order mark. Every problem is a
    :class:`ConfigError` naming the file: unreadable, not UTF-8 text, not YAML, a key given twice."""
    where = f"config file {path}" if path is not None else "config text"
    try:
        if text is not None:
            return yaml.load(text, Loader=StrictLoader)
        with open(path, "rb") as f:  # a file object: PyYAML's marks name the file
            return yaml.load(f, Loader=StrictLoader)
    except OSError as e:
        raise ConfigError(f"cannot read {where} ({e.strerror})") from None
    except yaml.reader.ReaderError as e:
        code = e.character if isinstance(e.character, int) else ord(e.character)
        guess = " (a NUL byte: UTF-16 without a byte-order mark, or not a text file?)" if code == 0 else ""
        raise ConfigError(f"{where} is not UTF-8 text ({e.reason}: #x{code:02x} at byte {e.position}{guess}); save "
                          f"it as UTF-8 (a UTF-16 file with a byte-order mark is read too)") from None
    except DuplicateKeyError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None


def check_min(cfg: Any, minimum: float, *names: str, above: bool = False, note: str = "") -> None:
    """Raise a :class:`ConfigError` naming the first of ``names`` (fields of ``cfg``) below ``minimum`` (``above``:
    not above it; NaN never passes) and its value: ``steps: -5 not accepted; use >= 0``. A group's errors get the
    group's prefix (``optim.``) from the loader."""
    for name in names:
        value = getattr(cfg, name)
        if not (value > minimum if above else value >= minimum):
            raise ConfigError(f"{name}: {value} not accepted; use {'>' if above else '>='} {minimum}{note}")


def check_range(cfg: Any, name: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False,
                note: str = "") -> None:
    """Raise a :class:`ConfigError` naming field ``name`` of ``cfg`` and its value when it is outside
    ``[low, high]`` (``open_low`` / ``open_high``: that end excluded)."""
    value = getattr(cfg, name)
    above = low < value if open_low else low <= value
    below = value < high if open_high else value <= high
    if not (above and below):
        span = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"{name}: {value} not accepted; use a value in {span}{note}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "group"
    return getattr(tp, "__name__", str(tp))


def _coerce_choice(value: Any, tp: Any, key: str) -> Any:
    """One of a ``Literal``'s choices, of the same type (True is not 1, 3.0 is not 3)."""
    choices = get_args(tp)
    if any(type(value) is type(c) and value == c for c in choices):
        return value
    if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: precision=no means 'no'
        spelled = [c for c in choices if isinstance(c, str) and yaml.safe_load(c) is value]
        if len(spelled) == 1:
            return spelled[0]
    raise ConfigError(f"{key}: {value!r} is not accepted; choose one of {_type_name(tp)}")


def _coerce_single(value: Any, tp: Any, item_tp: Any, key: str) -> Any:
    """One value where a list is expected (``data=shards/demo``, ``seeds: 0`` in a file): the list's only entry,
    checked as an entry. A mapping is one entry of a list of groups (``models={model: resnet50}``); null and the
    empty string are no entry (``key=[]`` empties a list)."""
    expected = f"{key}: expected {_type_name(tp)} or a single {_type_name(item_tp)}, got {value!r}"
    if value is None or value == "":
        raise ConfigError(f"{expected}; use {key}=[] for an empty list")
    if dataclasses.is_dataclass(item_tp) and isinstance(value, dict):
        return _coerce(value, item_tp, f"{key}[0]")  # errors name the entry's own key, e.g. models[0].task
    try:
        return _coerce(value, item_tp, key)
    except ConfigError:
        raise ConfigError(f"{expected} ({type(value).__name__})") from None


def _coerce_part(part: str, item_tp: Any, key: str) -> Any:
    """One part of ``a,b,c``: as written where that is accepted (strings stay strings: ``0x1f``, ``yes``), else read
    as a YAML scalar like a whole override (``seeds=0,1`` -> [0, 1])."""
    try:
        return _coerce(part, item_tp, key)
    except ConfigError:
        try:
            parsed = yaml.safe_load(part)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: {part!r} is not a value") from None
        if parsed == part or isinstance(parsed, (list, dict)) or parsed is None:
            raise
        return _coerce(parsed, item_tp, key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; allow only lossless conversions (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return _coerce_choice(value, tp, key)
    if origin in (Union, types.UnionType):
        # list members last: a single value becomes a one-element list only where no other member takes it as it is
        for arg in sorted(get_args(tp), key=lambda a: get_origin(a) in (list, tuple)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin in (list, tuple):
        (item_tp,) = get_args(tp)[:1] or (Any,)
        if isinstance(value, str) and "," in value:  # a,b,c: each part as a YAML scalar where the raw text is refused
            items = [_coerce_part(v.strip(), item_tp, f"{key}[{i}]") for i, v in enumerate(value.split(","))]
        elif isinstance(value, (list, tuple)):
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            items = [_coerce_single(value, tp, item_tp, key)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # pragma: no cover - a programming error


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + u for u in unknown)}; "
            f"accepted keys{' under ' + prefix[:-1] if prefix else ''}: {', '.join(names)}")
    kwargs = {name: _coerce(values[name], hints[name], prefix + name) for name in names if name in values}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe dict (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. num_samples=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {item!r}: the key {e.key!r} is given twice; keep one") from None
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip().lower() not in ("null", "none", "~"):
        value = raw
    return key, value


def repeated_overrides(overrides: list[str]) -> list[str]:
    """What :func:`apply_overrides` will decide by order: a key given again (``steps=3 steps=5``: the last wins, as
    in ``$FT steps=5`` after a shell variable that holds ``steps=3``), or a group beside one of its keys
    (``optim={lr: 1} optim.lr=2``: applied in order, so a later group replaces an earlier key). One line each."""
    seen: dict[str, str] = {}
    notes = []
    for item in overrides:
        key, _ = _parse_override(item)
        for other, earlier in seen.items():
            if key == other:
                notes.append(f"{key} is given twice ({earlier}, then {item}): the last wins")
            elif key.startswith(other + ".") or other.startswith(key + "."):
                notes.append(f"{earlier} and {item} overlap: applied in this order")
        seen[key] = item
    return notes


def apply_overrides(base: dict, overrides: list[str]) -> dict:
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, diff: dict) -> dict:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parent_of(tree: dict, dotted: str) -> tuple[dict | None, str]:
    """The mapping that holds ``dotted``'s last part (None when a parent is missing) and that part."""
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return (tree if isinstance(tree, dict) else None), last


def _drop_dotted(tree: dict, dotted: str) -> bool:
    node, last = _parent_of(tree, dotted)
    return node is not None and node.pop(last, None) is not None


def _rename_keys(tree: dict, renamed: dict[str, str], where: str, level: int = logging.WARNING) -> dict:
    """Move each ``old`` dotted key of ``tree`` to its ``new`` name, in place (a clear error when both are given
    with different values); one log line names the moves."""
    moved = []
    for old, new in renamed.items():
        node, last = _parent_of(tree, old)
        if node is None or last not in node:
            continue
        value = node.pop(last)
        target, new_last = _parent_of(tree, new)
        if target is not None and new_last in target and target[new_last] != value:
            raise ConfigError(f"{where}: {old} (now {new}) is {value!r} but {new} is {target[new_last]!r}; "
                              f"give only {new}")
        _set_dotted(tree, new, value)
        moved.append(f"{old} -> {new}")
    if moved:
        log.log(level, "%s: deprecated key name(s), read as the new ones: %s", where, ", ".join(moved))
    return tree


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                retired: tuple[str, ...] = (), text: str | None = None) -> Any:
    """Defaults of ``cls``, then the YAML diff at ``path`` (or in ``text``, read from elsewhere), then
    ``key=value`` overrides. ``retired`` dotted keys (written by an older synthvit into a run folder's config.yaml,
    never read) are dropped from the file. Keys renamed in ``cls.RENAMED_KEYS`` (a ``ClassVar`` mapping old dotted
    key -> new) are read under their new name from the file and from the overrides, with a warning (a note only
    for ``text``: a file an older synthvit wrote)."""
    tree: dict = {}
    if path is not None or text is not None:
        if text is None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
        else:
            path = path or "<text>"
        loaded = load_yaml(path, text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded
        dropped = [key for key in retired if _drop_dotted(tree, key)]
        if dropped:
            log.info("%s: ignoring retired key(s) %s", path, ", ".join(dropped))
    renamed = getattr(cls, "RENAMED_KEYS", {})
    _rename_keys(tree, renamed, str(path), logging.INFO if text is not None else logging.WARNING)
    override_tree = _rename_keys(apply_overrides({}, overrides or []), renamed, "command line")
    tree = _merge(tree, override_tree)
    try:
        cfg = _build(cls, tree)
    except ConfigError as e:
        where = f" (config file {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None
    object.__setattr__(cfg, GIVEN_ATTR, frozenset(_flat(tree)))
    return cfg


GIVEN_ATTR = "_synthvit_given"


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a config tree's leaves by dotted key."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def given_keys(cfg: Any) -> frozenset[str]:
    """The dotted keys the user gave (the config file's and the command line's) for a config :func:`load_config`
    built; empty for one built otherwise (every key then reads as a default). ``dataclasses.replace`` keeps none."""
    return getattr(cfg, GIVEN_ATTR, frozenset())


def config_diff(old: dict, new: dict) -> list[str]:
    """``dotted.key: old -> new`` for every leaf where two config trees differ (a key absent on one side is None)."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key: ``key: type = default  # help`` (nested groups flattened with dots, list entries as ``[]``)."""
    lines = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, prefix=f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        if isinstance(default, (list, tuple)):
            default = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in default]
        default_txt = yaml.safe_dump(default, default_flow_style=True, sort_keys=False, width=1 << 20).strip()
        default_txt = default_txt.removesuffix("...").strip()
        help_txt = f.metadata.get("help", "")
        lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {default_txt}" + (f"   # {help_txt}" if help_txt else ""))
        item_tp = get_args(tp)[0] if get_origin(tp) in (list, tuple) and get_args(tp) else None
        if dataclasses.is_dataclass(item_tp):  # the keys of each entry, e.g. models[].task
            lines.extend(describe(item_tp, prefix=f"{prefix}{f.name}[]."))
    return lines


def parse_size(value: int | str, key: str = "image_size") -> tuple[int, int]:
    """``256`` -> (256, 256); ``"3840x2160"`` -> (3840, 2160) as (width, height)."""
    if isinstance(value, int) and not isinstance(value, bool):
        w = h = value
    elif isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) == 1 and parts[0].isdigit():
            w = h = int(parts[0])
        elif len(parts) == 2 and all(p.isdigit() for p in parts):
            w, h = int(parts[0]), int(parts[1])
        else:
            raise ConfigError(f"{key}: {value!r} is not a size; use an int (512) or WIDTHxHEIGHT (3840x2160)")
    else:
        raise ConfigError(f"{key}: {value!r} is not a size; use an int (512) or WIDTHxHEIGHT (3840x2160)")
    return w, h


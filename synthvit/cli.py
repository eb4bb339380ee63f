"""``synthvit <stage> [--config FILE] [dotted.key=value ...]``: parse, then dispatch (imports are lazy)."""
from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

from synthvit.config import ConfigError, describe, load_config, repeated_overrides
from synthvit.io import SynthvitError

log = logging.getLogger("synthvit.cli")


@dataclass(frozen=True)
class Stage:
    config: str  # "module:Class" of the stage's config dataclass (a light module)
    run: str  # "module:function" taking the config and returning the output folder
    summary: str


STAGES: dict[str, Stage] = {
    "generate": Stage("generate.config:GenerateConfig", "generate.run:run",
                      "render synthetic defect images with masks and labels into WebDataset shards"),
    "pretrain": Stage("pretrain.config:PretrainConfig", "pretrain.run:run",
                      "pretrain a timm model on synthvit shards with CutMix, through Accelerate"),
    "doctor": Stage("finetune.config:DoctorConfig", "finetune.doctor:run",
                    "check a real-data folder against the run planned on it (sizes, split, classes, defect sizes vs "
                    "stride/crop/tile, broken files) and advise settings; exit 1 when problems are found"),
    "finetune": Stage("finetune.config:FinetuneConfig", "finetune.run:run",
                      "fine-tune a ViT or CNN baseline on real high-res images; tiled full-resolution test metrics"),
    "evaluate": Stage("finetune.config:EvaluateConfig", "finetune.run:run_evaluate",
                      "evaluate a finetune run on a split at full resolution (metrics_<split>.json)"),
    "calibrate": Stage("finetune.config:CalibrateRunConfig", "finetune.run:run_calibrate",
                       "fit a finetune run's defect decision (p(defect) threshold) from its training frames again"),
    "predict": Stage("finetune.config:PredictConfig", "finetune.run:run_predict",
                     "predict masks, overlays and JSON with a finetune run for an image, a folder, a glob or a list "
                     "of frames (a re-run skips finished frames)"),
    "export": Stage("finetune.config:ExportConfig", "finetune.deploy:run_export",
                    "export a finetune run for ONNX Runtime or OpenVINO (fp32, fp16, int8): the model over a batch "
                    "of tiles plus deploy.json, a folder predict runs as it runs the run"),
    "compare": Stage("synthvit.compare.config:CompareConfig", "synthvit.compare.run:run",
                     "run a matrix of models x real-data budgets (finetune + evaluate per cell) and write a report"),
}

# OSErrors about the machine rather than the code, even without a file name
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO}
USAGE = "usage: synthvit <stage> [--config FILE] [key=value ...]   (synthvit <stage> --help lists the keys)"


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _stage_help(name: str) -> str:
    stage = STAGES[name]
    lines = [f"usage: synthvit {name} [--config FILE] [key=value ...]", "", stage.summary, "",
             "Keys (YAML files in configs/ hold diffs over these defaults; key=value overrides them):"]
    lines += describe(_load(stage.config))
    return "\n".join(lines)


def _main_help() -> str:
    lines = [USAGE, "", "stages:"]
    lines += [f"  {name:<10} {stage.summary}" for name, stage in STAGES.items()]
    for name in STAGES:
        lines += ["", _stage_help(name)]
    return "\n".join(lines)


def _parse(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config file, key=value overrides) from the arguments after the stage name."""
    config, overrides = None, []
    rest = iter(argv[1:])
    for arg in rest:
        if arg in ("--config", "-c"):
            config = next(rest, None)
            if config is None:
                raise ConfigError("--config needs a file path")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("--") and len(arg) > 2:  # --key value / --key=value, as in `predict --input X`
            key, eq, value = arg[2:].partition("=")
            if not eq:
                value = next(rest, None)
                if value is None:
                    raise ConfigError(f"{arg} needs a value")
            overrides.append(f"{key.replace('-', '_')}={value}")
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}; options are --config FILE and --help, then key=value overrides")
        else:
            overrides.append(arg)
    return config, overrides


def _end_bars() -> None:
    """A progress bar an error interrupted ends its line first: the error is a line of its own."""
    progress = sys.modules.get("synthvit.progress")  # never imported: no bar to end
    if progress is not None:
        progress.close_bars()


def _os_error(e: OSError) -> str:
    """One line for an OSError that no stage turned into a SynthvitError: what failed, on which file, what to do."""
    files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return (f"{e.strerror or e}{': ' + files if files else ''}; check that the path exists, its permissions and "
            f"the free space, then re-run (finished work is kept)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_main_help())
        return 0 if argv else 2
    if argv[0] not in STAGES:
        print(f"synthvit: error: unknown stage {argv[0]!r}; stages: {', '.join(STAGES)}\n{USAGE}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(_stage_help(argv[0]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("accelerate", "botocore", "aiobotocore", "s3fs", "fsspec"):  # their INFO lines say nothing to fix
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        # A parent that ignores SIGINT (some launchers, test runners) passes that on to us; Ctrl-C must still stop
        # a long stage cleanly, keeping finished work.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    name = argv[0]
    try:
        config_path, overrides = _parse(argv)
        for note in repeated_overrides(overrides):
            log.warning("command line: %s", note)
        cfg = load_config(_load(STAGES[name].config), config_path, overrides)
        out = _load(STAGES[name].run)(cfg)
    except ConfigError as e:
        _end_bars()
        print(f"synthvit {name}: config error: {e}", file=sys.stderr)
        return 2
    except SynthvitError as e:
        _end_bars()
        print(f"synthvit {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _end_bars()
        print(f"synthvit {name}: interrupted; finished work is kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    except OSError as e:  # a file or folder that went away or became unwritable mid-run, a full disk
        if e.filename is None and e.errno not in ENVIRONMENT_ERRNOS:
            raise  # not about a file the user can fix: a bug, keep its traceback
        _end_bars()
        print(f"synthvit {name}: error: {_os_error(e)}", file=sys.stderr)
        return 1
    if out is not None and os.environ.get("RANK", "0") == "0":
        print(f"synthvit {name}: done -> {out}")
    return 0

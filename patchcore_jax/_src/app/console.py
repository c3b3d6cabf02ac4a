"""What the command line's commands share: one-line messages, usage errors, progress bars, and the
model options turned into checked settings. With `cli` and `commands`, the only code that prints."""

from __future__ import annotations

import os
import re
import sys
import warnings


def random_backbone_note(configs) -> str:
    """The warning every command gives when a backbone has no weights, naming where to get the
    pretrained weights of the backbones actually used (not always WideResNet's)."""
    from patchcore_jax._src.io import hub

    configs = configs if isinstance(configs, (list, tuple)) else [configs]
    names = []
    for c in configs:
        if c.weights is None:
            alias, repo = hub.NAMED.get(c.backbone, (None, None))
            names.append(f"--weights {alias} (timm's {repo}) for {c.backbone}" if alias else
                         f"a torchvision/timm ImageNet state dict of {c.backbone} as --weights FILE")
    return ("NOTE: no --weights given, so the backbone is RANDOMLY initialised (not pretrained). PatchCore's accuracy "
            "comes from ImageNet features: expect far lower numbers than with pretrained weights. Pass "
            + "; ".join(names) + ".")


# Config fields as the options that set them, so errors name what the user typed.
OPTION_OF = {
    "backbone": "--backbone", "weights": "--weights", "resize": "--resize", "crop": "--crop",
    "coreset_fraction": "--coreset", "num_neighbors": "--neighbors", "seed": "--seed", "batch_size": "--batch-size",
    "projection_dim": "--projection-dim", "coreset_dtype": "--coreset-dtype", "geometry": "--geometry",
    "layers": "--layers", "target_dim": "--target-dim", "pretrain_dim": "--pretrain-dim", "search": "--search",
}


class UsageError(Exception):
    """Bad arguments or input: reported as one line, exit status 2."""


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def printable(message: str) -> str:
    """`message` with undecodable bytes and control characters (ESC, BEL, CR, tab...; not the line
    break) written as \\xNN, so a file's name never reaches a terminal as a command."""
    from patchcore_jax._src.model.images import display

    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", display(message))


def say(message: str, file=None) -> None:
    """Prints a line whatever bytes or control characters a path in it holds (`printable`)."""
    file = file or sys.stdout
    print(printable(message), file=file, flush=True)


def version() -> str:
    from patchcore_jax._src.version import __version__

    return __version__


# -- the compilation cache ------------------------------------------------------------------------------
CACHE_ENV = "PATCHCORE_JAX_COMPILATION_CACHE"


def compilation_cache_dir(environ=None) -> str | None:
    """Where the command line keeps compiled programs between runs: `$PATCHCORE_JAX_COMPILATION_CACHE`
    (a folder, or 0/off/false/no for none), else JAX's own `$JAX_COMPILATION_CACHE_DIR` when set, else
    `$XDG_CACHE_HOME/patchcore-jax/jax` (`~/.cache/patchcore-jax/jax`)."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(CACHE_ENV, "").strip()
    if chosen.lower() in ("0", "off", "false", "no", "none"):
        return None
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "patchcore-jax", "jax")


def use_compilation_cache(enabled: bool) -> str | None:
    """Turns JAX's persistent compilation cache on for this process (before anything compiles), so a
    second run of a command reads its programs back instead of compiling them; returns the folder, or
    None when it is off (`--no-compile-cache`, or the environment says so) or cannot be created."""
    folder = compilation_cache_dir() if enabled else None
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the small programs add up too
    return folder


# -- shared argument handling ---------------------------------------------------------------------------
def weights_spec(weights: str) -> str:
    """Checks a --weights value now (a file, or a name fetched or found in the Hub cache)."""
    from patchcore_jax._src.io import hub

    if hub.repo_of(weights) is not None:
        try:
            hub.resolve(weights)  # fetched (or found in the cache) now, before any work
        except ValueError as err:
            raise UsageError(f"--weights {err}") from None
        return weights
    if not os.path.isfile(weights):
        raise UsageError(f"--weights {weights}: no such file (nor a known name: an alias such as "
                         f"{', '.join(sorted(hub.ALIASES)[:4])}, ... or a Hub repository org/name)")
    if not weights.endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise UsageError(f"--weights {weights}: expected a .safetensors or .pth state dict")
    return os.path.abspath(weights)


def configs_from_args(args, **overrides) -> list:
    """One PatchCoreConfig per --backbone (an ensemble when repeated), with one --weights per backbone."""
    from patchcore_jax._src.model.config import PatchCoreConfig

    backbones = getattr(args, "backbone", None) or [None]
    weights = getattr(args, "weights", None) or [None] * len(backbones)
    if len(weights) != len(backbones):
        raise UsageError(f"--weights: give one per --backbone ({len(backbones)} backbones, {len(weights)} --weights)")
    if len(backbones) > 1 and getattr(args, "layers", None):
        raise UsageError("--layers: applies to a single --backbone; ensemble members use each backbone's natural taps")
    shared = {name: getattr(args, name) for name in OPTION_OF
              if name not in ("backbone", "weights") and getattr(args, name, None) is not None}
    shared.update(overrides)
    configs = []
    for backbone, weight in zip(backbones, weights):
        fields = dict(shared)
        if backbone is not None:
            fields["backbone"] = backbone
        if weight is not None:
            fields["weights"] = weights_spec(weight)
        try:
            configs.append(PatchCoreConfig(**fields))
        except ValueError as err:
            field, _, rest = str(err).partition(": ")
            if field in OPTION_OF:
                raise UsageError(f"{OPTION_OF[field]}: {rest}") from None
            raise UsageError(str(err)) from None
    return configs


def config_from_args(args, **overrides):
    configs = configs_from_args(args, **overrides)
    if len(configs) > 1:
        raise UsageError(f"--backbone: patchcore-jax {args.command} takes one backbone, got {len(configs)}")
    return configs[0]


def add_model_options(p, *, coreset_default=None):
    p.add_argument("--weights", action="append",
                   help="torchvision/timm state dict (.safetensors, or .pth with torch installed), or a name fetched "
                        "once through the Hugging Face cache: timm/wide_resnet50_2.tv_in1k, or an alias (wrn50, wrn101, "
                        "r18, r50, rx101, dn201, ...); one per --backbone")
    p.add_argument("--backbone", action="append",
                   help="torchvision name: resnet18/34/50/101, wide_resnet50_2/101_2, resnext50_32x4d, resnext101_32x8d, "
                        "densenet121/169/201 (default wide_resnet50_2); repeat it for an ensemble")
    p.add_argument("--layers", nargs="+", help="feature taps, finest first (default layer2 layer3; DenseNet: "
                                                "denseblock2 denseblock3)")
    p.add_argument("--coreset", dest="coreset_fraction", type=float, default=coreset_default,
                   help="coreset fraction, the paper's PatchCore-n%% (default 0.1)")
    p.add_argument("--resize", type=int, help="shorter side after resizing (default 256)")
    p.add_argument("--crop", type=int, help="centre crop size (default 224)")
    p.add_argument("--geometry", choices=("center_crop", "squash"),
                   help="center_crop (default: resize the shorter side, crop the centre) or squash (resize the "
                        "whole image to crop x crop)")
    p.add_argument("--neighbors", dest="num_neighbors", type=int, help="b of Eq. 7 (default 9; 1 = plain maximum)")
    p.add_argument("--target-dim", type=int, help="patch feature width after aggregation (default 1024; the published "
                                                   "ensembles use 384)")
    p.add_argument("--pretrain-dim", type=int, help="per-layer width before the final pooling (default 1024)")
    p.add_argument("--projection-dim", type=int, help="coreset projection width (default 128; 0 = none)")
    p.add_argument("--coreset-dtype", choices=("float32", "bfloat16"), help="storage of the projected bank")
    p.add_argument("--search", choices=("auto", "brute", "clustered"),
                   help="exact search index: clustered (prunes; fastest on a CPU), brute (for GPU/TPU), or auto "
                        "(default: by the backend the model runs on); the same results")
    p.add_argument("--batch-size", type=int, help="images per compiled step (default 8)")
    p.add_argument("--seed", type=int, help="seed of projection, start points and a random backbone (default 0)")


def new_model(cfg, *, quiet: bool):
    """A PatchCore for one config, an ensemble for several, reporting to progress bars unless quiet."""
    from patchcore_jax._src.api.ensemble import PatchCoreEnsemble
    from patchcore_jax._src.api.patchcore import PatchCore

    progress = progress_for(quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        if isinstance(cfg, list):
            return PatchCore(cfg[0], progress=progress) if len(cfg) == 1 else PatchCoreEnsemble(cfg, progress=progress)
        return PatchCore(cfg, progress=progress)


class ProgressBars:
    """A progress callback `(stage, done, total)` drawn as one tqdm bar per stage on stderr when it is a
    terminal; otherwise (a log file, a pipe) as plain lines, with no carriage returns or cursor moves:
    a stage's first step, then at most one line every `every` seconds, and its end."""

    def __init__(self, stream=None, *, every: float = 10.0):
        self.stream = stream
        self.every = every
        self.bars = {}
        self.lines = {}  # stage -> (time of the last line, last done)

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        stream = self.stream or sys.stderr
        if not stream.isatty():
            self._line(stream, stage, done, total)
            return
        bar = self.bars.get(stage)
        if bar is None:
            from tqdm.auto import tqdm

            unit = "step" if "coreset" in stage else "img"
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=unit, leave=False, file=stream)
        bar.update(done - bar.n)

    def _line(self, stream, stage: str, done: int, total: int | None) -> None:
        import time

        now = time.monotonic()
        last = self.lines.get(stage)
        finished = total is not None and done >= total
        if last is not None and not finished and now - last[0] < self.every:
            return
        if last is not None and last[1] == done:
            return
        self.lines[stage] = (now, done)
        unit = "step" if "coreset" in stage else "image"
        count = f"{done}/{total}" if total is not None else str(done)
        say(f"{stage}: {count} {unit}{'s' if (total or done) != 1 else ''}", stream)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.lines.clear()


def progress_for(quiet: bool):
    """The progress callback of a command: bars on stderr, or none with --quiet."""
    return None if quiet else ProgressBars()


def list_checked(paths, cfg, *, what: str, exclude=(), skipped: list | None = None):
    """Lists image files and reads every header now (mode, size, and the size after resizing), so a
    bad file stops the run before any work. With `skipped` (a list), a file that cannot be read (its
    header, or, read in full, its pixels) is appended as `(path, reason)` and left out instead."""
    from patchcore_jax._src.model.images import check_image, display, list_images, read_image

    found = list_images(paths, exclude=exclude)
    if not found:
        raise UsageError(f"{' '.join(display(p) for p in ([paths] if isinstance(paths, str) else paths))}: "
                         f"no {what} found (looked for .png, .jpg, .bmp, .tif, ... files; hidden files are skipped)")
    kept = []
    for p in found:
        try:
            h, w = check_image(p)
            cfg.image_geometry.check(h, w, name=display(p))
            if skipped is not None:
                read_image(p)  # the pixels too: a truncated file has a good header
        except ValueError as err:
            if skipped is None:
                raise
            skipped.append((p, str(err)))
            continue
        kept.append(p)
    return kept


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """"1 image", "2 images"."""
    return f"{count} {noun if count == 1 else (plural_form or noun + 's')}"


def check_bank_size(model, num_images: int) -> None:
    size = model.bank_size_for(num_images)
    if size < model.config.num_neighbors:
        raise UsageError(f"--neighbors {model.config.num_neighbors}: {num_images} training images give a memory bank "
                         f"of {size} rows; use at most {size}, more images, or a larger --coreset")

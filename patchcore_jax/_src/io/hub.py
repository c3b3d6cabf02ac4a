"""Pretrained weights by name, through the Hugging Face Hub cache (`huggingface_hub`).

`weights="timm/wide_resnet50_2.tv_in1k"` (any `org/name` Hub model repository holding a
`model.safetensors`), or a short alias (`NAMED`), is downloaded once into the Hub's own cache
(`HF_HUB_CACHE`, by default `~/.cache/huggingface/hub`), checked against the sha256 that the Hub
names its stored file by, and read as safetensors (no torch). timm's `*.tv_in1k` files hold
torchvision's ImageNet weights under torchvision's key names, the ones the published PatchCore uses.
Offline (`HF_HUB_OFFLINE=1`, or no network) a cached file is used; an empty cache fails with one
line saying how to get the file. `HF_HUB_CACHE` and `HF_ENDPOINT` are read at each call;
`HF_HUB_OFFLINE=1` at each call too (and by huggingface_hub itself, once, when it is imported).
"""

from __future__ import annotations

import os
import re

from patchcore_jax._src.io import atomic

FILENAME = "model.safetensors"
# Per backbone: the timm repository of torchvision's IMAGENET1K_V1 weights, and its short alias.
NAMED = {
    "resnet18": ("r18", "timm/resnet18.tv_in1k"),
    "resnet34": ("r34", "timm/resnet34.tv_in1k"),
    "resnet50": ("r50", "timm/resnet50.tv_in1k"),
    "resnet101": ("r101", "timm/resnet101.tv_in1k"),
    "wide_resnet50_2": ("wrn50", "timm/wide_resnet50_2.tv_in1k"),
    "wide_resnet101_2": ("wrn101", "timm/wide_resnet101_2.tv_in1k"),
    "resnext50_32x4d": ("rx50", "timm/resnext50_32x4d.tv_in1k"),
    "resnext101_32x8d": ("rx101", "timm/resnext101_32x8d.tv_in1k"),
    "densenet121": ("dn121", "timm/densenet121.tv_in1k"),
    "densenet169": ("dn169", "timm/densenet169.tv_in1k"),
    "densenet201": ("dn201", "timm/densenet201.tv_in1k"),
}
ALIASES = {alias: repo for alias, repo in NAMED.values()}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def repo_of(spec: str) -> str | None:
    """The Hub repository a weights spec names (an alias or `org/name`), or None for a file path.
    An existing file always wins over a name."""
    if os.path.exists(spec):
        return None
    if spec in ALIASES:
        return ALIASES[spec]
    return spec if _REPO_ID.match(spec) else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(spec: str, *, cache_dir: str | None = None) -> str:
    """A weights spec -> a local file path. File paths pass through; names are fetched into (or found
    in) the Hub cache and verified. ValueError, one line, when the file cannot be had or is damaged."""
    repo = repo_of(spec)
    if repo is None:
        return spec
    from huggingface_hub import constants, hf_hub_download

    where = cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        path = hf_hub_download(repo, FILENAME, cache_dir=where, local_files_only=_offline(),
                               endpoint=os.environ.get("HF_ENDPOINT") or None)
    except Exception as err:  # the Hub raises many kinds (offline, not found, gated, network)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"weights {spec!r} ({repo}/{FILENAME}): not in the Hugging Face cache ({where}) and not downloadable "
            f"here ({type(err).__name__}: {reason[:160]}); on a machine with network run "
            f"`hf download {repo} {FILENAME}` (or `huggingface-cli download ...`) and copy its cache, set "
            f"HF_HUB_CACHE to it, or pass --weights FILE"
        ) from None
    verify(path, spec)
    return path


def verify(path: str, spec: str = "") -> None:
    """The Hub cache stores a large file under its sha256 (its LFS ETag, the Hub's record of the
    content) in `blobs/`, and links it from `snapshots/<revision>/`: the content must match it.

    A cache copied without links (`cp -rL`, scp, zip, a Windows copy) holds the snapshot as a plain
    file beside a copy of `blobs/`: the content's sha256 must then name one of those blobs. A copy
    without `blobs/` cannot be verified and is refused; to use such a file anyway, pass its path as
    the weights (`--weights FILE`): a path is used as it is, unverified."""
    real = os.path.realpath(path)
    blob = os.path.basename(real)
    if _SHA256.match(blob):
        if atomic.file_sha256(path) != blob:
            raise ValueError(f"{real}: the cached weights {spec!r} do not match their sha256 "
                             "(damaged or modified); delete the file and download it again")
        return
    blobs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(real))), "blobs")
    recorded = {name for name in _listdir(blobs) if _SHA256.match(name)}
    if not recorded:
        raise ValueError(f"{path}: cannot verify the weights {spec!r}: the cache entry is a plain file (a copy "
                         f"without links?) and {blobs} holds no sha256-named blobs to check it against; copy the "
                         "cache with its blobs/ folder, or pass the file itself as --weights FILE to use it unverified")
    if atomic.file_sha256(path) not in recorded:
        raise ValueError(f"{real}: the cached weights {spec!r} match no sha256 recorded in {blobs} "
                         "(damaged or modified); delete the file and download it again")


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []

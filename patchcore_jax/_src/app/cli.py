"""The `patchcore-jax` command line: the only place that parses arguments or prints.

Every argument and output location is validated before any work starts. Exit codes: 0 success; 2 bad
usage or bad input, or a full disk (one line naming the path or value given); 1 an unexpected failure
(one line; `--debug`, accepted in any position, shows the traceback); 3 done, but `predict
--skip-unreadable` skipped files (each named); 130 interrupted (SIGINT, Ctrl-C), 143 terminated
(SIGTERM), each after its cleanup (see `app.signals`).
"""

from __future__ import annotations

import argparse
import errno
import sys

from patchcore_jax._src.app import signals
from patchcore_jax._src.app.console import (
    UsageError, add_model_options, close_progress_bars, say, use_compilation_cache, version,
)



FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota: exit 2, naming the file


# -- the parser -----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (exit status 2) that point at --help."""

    def error(self, message):
        say(f"{self.prog}: error: {message} (see {self.prog} --help)", sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of failures")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("--no-compile-cache", action="store_true", default=argparse.SUPPRESS,
                        help="do not keep compiled programs between runs (default: kept in "
                             "$XDG_CACHE_HOME/patchcore-jax/jax, or ~/.cache/...; the environment variable "
                             "PATCHCORE_JAX_COMPILATION_CACHE names another folder, or 0 for none)")
    parser = _Parser(prog="patchcore-jax", description="PatchCore anomaly detection in JAX.", parents=[common])
    parser.add_argument("--version", action="version", version=f"patchcore-jax {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="fit and evaluate on an embedded synthetic defect set (no files needed)",
                       description="Makes a deterministic synthetic defect data set, fits, predicts, prints image AUROC, "
                                   "pixel AUROC and AU-PRO, checks the JAX numerics against the NumPy reference, and "
                                   "writes results.json and heatmap PNGs.")
    p.add_argument("--out", default="demo-out", help="output folder, new or an earlier demo's (default demo-out)")
    p.add_argument("--train", type=int, default=40, help="nominal training images (default 40)")
    p.add_argument("--test-good", type=int, default=16, help="good test images (default 16)")
    p.add_argument("--test-defect", type=int, default=24, help="defective test images (default 24)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    add_model_options(p)
    p.set_defaults(func="cmd_demo")

    p = sub.add_parser("fit", parents=[common], help="build a model from a folder of defect-free images")
    p.add_argument("--train", required=True, help="folder (searched recursively) or image of defect-free images")
    p.add_argument("--out", required=True, help="model folder to write: new, empty, or an earlier model")
    p.add_argument("--threshold-from", help="folder of held-out good images: sets the image and pixel thresholds "
                                            "and the score scale from them")
    p.add_argument("--quantile", type=float, default=1.0,
                   help="quantile of the held-out good scores and map values (default 1.0 = max)")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="without --threshold-from or --validation: the fraction of the training images held out "
                        "to set default thresholds (scored by a model fitted on the rest; the model kept is fitted "
                        "on all; default 0.2; 0 = no image threshold)")
    p.add_argument("--validation", help="labelled folder (good/ and defect sub-folders; masks in ground_truth/<kind>/"
                                        "<name>_mask.png when present): F1-optimal image (and pixel) thresholds")
    p.add_argument("--mask-rule", choices=("published", "half"), default="published",
                   help="validation masks after resizing: published (only 255 counts) or half (>= 128)")
    add_model_options(p)
    p.set_defaults(func="cmd_fit")

    p = sub.add_parser("predict", parents=[common], help="score images with a fitted model")
    p.add_argument("--model", required=True, help="model folder written by fit")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder, new or an earlier predict's: scores.csv, run.json and "
                                                "heatmaps/")
    p.add_argument("--threshold", type=float, help="image threshold (overrides the model's)")
    p.add_argument("--pixel-threshold", type=float, help="pixel threshold: outlines and masks (overrides the model's)")
    p.add_argument("--no-heatmaps", action="store_true", help="no heatmap panels")
    p.add_argument("--save-maps", action="store_true", help="raw anomaly maps as float32 maps/<input>.npy")
    p.add_argument("--save-masks", action="store_true", help="predicted defect regions as masks/<input>.png (255 = "
                                                             "defect; empty for an image judged fine)")
    p.add_argument("--full-frame", action="store_true",
                   help="maps, panels and masks at each image's original size, the region outside the crop marked "
                        "as not inspected (NaN in the .npy maps)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="score the readable images and skip the others (each named on stderr and in run.json; exit "
                        "status 3); without it, an unreadable image stops the run before any work")
    p.set_defaults(func="cmd_predict")

    p = sub.add_parser("evaluate", parents=[common], help="fit and evaluate per category on MVTec AD, MTD or mSTC",
                       description="Runs the paper's protocol on a data set folder you provide (nothing is downloaded) "
                                   "and writes results.json, results.csv, scores.csv (every test image's score) and heatmaps for every kind of test image. Resumable: a "
                                   "category whose inputs and settings are unchanged is kept.")
    p.add_argument("--dataset", required=True, choices=("mvtec", "mtd", "mstc"))
    p.add_argument("--root", required=True, help="the data set's folder (see README for the layouts)")
    p.add_argument("--categories", nargs="+", help="categories (mSTC: scenes 01..12) to run; default all present")
    p.add_argument("--out", required=True, help="output folder, new or an earlier evaluate's")
    p.add_argument("--source", choices=("folder", "tfds"), default="folder",
                   help="read files directly, or through a TFDS array_record preparation (default folder)")
    p.add_argument("--tfds-dir", help="where TFDS preparations live (default OUT/tfds)")
    p.add_argument("--heatmaps", type=int, default=2,
                   help="heatmap panels per kind of test image: good and every defect type (default 2)")
    p.add_argument("--save-models", action="store_true", help="also write each category's fitted model to "
                                                             "OUT/models/<category>/ (usable by predict)")
    p.add_argument("--mask-rule", choices=("published", "half"), default="published",
                   help="ground-truth pixels after resizing: published (only full 255 counts, as the published "
                        "code; default) or half (>= 128)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace category results in OUT made with other settings (default: refused; give a new "
                        "--out, or compare settings with sweep)")
    add_model_options(p)
    p.set_defaults(func="cmd_evaluate")

    p = sub.add_parser("sweep", parents=[common], help="evaluate a grid of settings over seeds, features extracted once",
                       description="Runs evaluate's protocol for every cell of a grid of settings and every seed, "
                                   "extracting the backbone's features once (kept in OUT/features/), and writes "
                                   "results.csv, table.md and plots/. Resumable: rerunning the same command keeps "
                                   "every finished unit. See docs/sweep.md.")
    p.add_argument("--dataset", required=True, choices=("mvtec", "mtd", "mstc"))
    p.add_argument("--root", required=True, help="the data set's folder (see README for the layouts)")
    p.add_argument("--out", required=True, help="output folder, new or an earlier sweep's")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a swept setting: a PatchCoreConfig field (coreset_fraction, patch_size, layers as "
                        "layer2+layer3, num_neighbors, anomaly_scorer_num_nn, sampler, resize, ...) or shots "
                        "(training images per category); repeat for more keys (the cells are their product)")
    p.add_argument("--seeds", default="0", help="seeds of every cell, comma-separated (default 0)")
    p.add_argument("--categories", nargs="+", help="categories (mSTC: scenes 01..12) to run; default all present")
    p.add_argument("--mask-rule", choices=("published", "half"), default="published",
                   help="ground-truth pixels after resizing: published (only full 255 counts; default) or half")
    p.add_argument("--dry-run", action="store_true", help="list the cells and what they reuse, and stop")
    p.add_argument("--remove-features", action="store_true",
                   help="delete the extracted features (OUT/features/) when the sweep is done")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="several processes (hosts): process 0's address and a free port; every process runs the same "
                        "command with --num-processes and its own --process-id (the units are split across them, "
                        "process 0 writes OUT)")
    p.add_argument("--num-processes", type=int, metavar="N", help="the number of processes (with --coordinator)")
    p.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1 (with --coordinator)")
    p.add_argument("--distributed", action="store_true",
                   help="several processes, found by JAX itself (TPU VMs, Slurm, Open MPI): no addresses needed")
    add_model_options(p)
    p.set_defaults(func="cmd_sweep")

    p = sub.add_parser("convert-weights", parents=[common], help="convert a .pth state dict to .safetensors (needs torch once)")
    p.add_argument("input", help="torchvision/timm .pth state dict")
    p.add_argument("output", help="destination .safetensors (must not exist)")
    p.set_defaults(func="cmd_convert_weights")

    p = sub.add_parser("export", parents=[common], help="write a fitted model as one StableHLO or ONNX program",
                       description="Writes the model folder MODEL as one self-contained program (backbone weights, "
                                   "memory bank and settings inside): input uint8 crops (B, crop, crop, 3) prepared "
                                   "as the model prepares images, outputs image scores (B,) and anomaly maps (B, "
                                   "crop, crop). It is checked against the model before it is written.")
    p.add_argument("model", metavar="MODEL", help="model folder written by fit")
    p.add_argument("--format", required=True, choices=("stablehlo", "onnx"),
                   help="stablehlo (jax.export; runs with JAX alone on CPU, GPU, TPU) or onnx (needs "
                        "pip install 'patchcore-jax[export]')")
    p.add_argument("--out", required=True, help="the file to write (must not exist)")
    p.add_argument("--batch", type=int, help="fix the batch size (default: any batch)")
    p.set_defaults(func="cmd_export")
    return parser


def main(argv=None) -> int:
    """Runs one command; returns its exit status. Run as the program (`argv` None), an interrupted
    command ends the process by its signal once its cleanup is done (`signals.end_process`)."""
    command = ""
    with signals.interruptible():  # first: a Ctrl-C while the libraries load is one line too
        try:
            args = build_parser().parse_args(argv)
            command = f" {args.command}"
            args.debug = getattr(args, "debug", False)
            args.quiet = getattr(args, "quiet", False)
            args.no_compile_cache = getattr(args, "no_compile_cache", False)
            return run(args)
        except KeyboardInterrupt as err:
            status = err.exit_status if isinstance(err, signals.Interrupted) else 130
            name = err.name if isinstance(err, signals.Interrupted) else "SIGINT"
            say(f"patchcore-jax{command}: {'terminated' if status == 143 else 'interrupted'} ({name}); "
                "stopped before the end, temporary files removed", sys.stderr)
            if argv is None:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                signals.end_process(status - 128)
            return status


def run(args) -> int:
    """Runs the command `args.func` names (a function of `commands`); its failures become one line and an
    exit status (see the module docstring)."""
    try:
        if args.command != "convert-weights":
            use_compilation_cache(not args.no_compile_cache)
        from patchcore_jax._src.app import commands  # the libraries load here, after `main` took the signals

        return getattr(commands, args.func)(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        message = str(err).replace("\n", " ")
        say(f"patchcore-jax {args.command}: error: {message}", sys.stderr)
        return 2
    except OSError as err:
        if args.debug:
            raise
        if err.errno not in FULL:
            say(f"patchcore-jax {args.command}: unexpected failure: {type(err).__name__}: {err} (rerun with --debug)",
                sys.stderr)
            return 1
        where = f" writing {err.filename}" if err.filename else ""
        say(f"patchcore-jax {args.command}: error: {err.strerror}{where}; free some space there (or write elsewhere: "
            "--out; $TMPDIR for fit's temporary bank) and run it again", sys.stderr)
        return 2
    except Exception as err:  # one line for users; --debug for the traceback
        if args.debug:
            raise
        message = str(err).replace("\n", " ")
        say(f"patchcore-jax {args.command}: unexpected failure: {type(err).__name__}: {message} (rerun with --debug)",
             sys.stderr)
        return 1
    finally:
        close_progress_bars()  # a last message starts on a line of its own


if __name__ == "__main__":
    sys.exit(main())

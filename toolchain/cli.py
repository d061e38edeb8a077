"""`edge-convert`: parse, call, print. The work itself lives in the other modules."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from protocol.manifest import MANIFEST_FILE, ManifestError, SignedManifest, read_manifest
from protocol.signing import (
    SigningKeyError,
    TrustedKey,
    generate_keypair,
    load_public_key,
    verify_bundle,
)
from toolchain.errors import AccuracyGateError, ArtifactError, EdgeConvertError, OptionError
from toolchain.quantize import MODE_CHOICES

F = TypeVar("F", bound=Callable[..., Any])

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    stderr.print(f"[red]edge-convert: error:[/] {escape(message)}")
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, "exit_code": code, **(extra or {})}))
    sys.exit(code)


def handles_errors(command: F) -> F:
    """One line on stderr and an exit code for every failure; a traceback only on --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        as_json = kwargs.get("as_json", False)
        try:
            return command(*args, **kwargs)
        except AccuracyGateError as exc:
            if debug:
                traceback.print_exc()
            extra = {}
            if exc.result is not None:
                from toolchain.console import convert_json, print_convert_summary

                if as_json:
                    extra = {"candidates": convert_json(exc.result)["candidates"]}
                else:
                    print_convert_summary(stdout, exc.result)
            _fail(str(exc), exc.exit_code, as_json, extra)
        except EdgeConvertError as exc:
            if debug:
                traceback.print_exc()
            _fail(str(exc), exc.exit_code, as_json)
        except (ManifestError, SigningKeyError) as exc:
            if debug:
                traceback.print_exc()
            _fail(str(exc), 2, as_json)
        except OSError as exc:
            # A folder that cannot be created, a disk that is full: the user's to fix.
            if debug:
                traceback.print_exc()
            _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 2, as_json)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130, as_json)
        except Exception as exc:
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)", 3, as_json)
        return None

    return wrapper  # type: ignore[return-value]


def debug_option(command: F) -> F:
    return click.option(
        "--debug", is_flag=True, help="Show tracebacks and TensorFlow's own output."
    )(command)


def json_option(command: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(
        command
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgefleet", prog_name="edge-convert")
def cli() -> None:
    """Convert TensorFlow models to validated, benchmarked, signed TFLite bundles."""


@cli.command()
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Key folder.")
@debug_option
@handles_errors
def keygen(out: Path, debug: bool) -> None:
    """Make an Ed25519 signing key pair: KEYDIR/signing.key (mode 600) and signing.pub."""
    try:
        private, public = generate_keypair(out)
    except SigningKeyError as exc:
        raise OptionError(str(exc)) from None
    key = load_public_key(public)
    stdout.print(f"private key: {private} (keep it secret)")
    stdout.print(f"public key:  {public} (give it to the fleet server and devices)")
    stdout.print(f"key id:      {key.keyid}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.option(
    "--quantize",
    type=click.Choice(MODE_CHOICES),
    default="float32",
    show_default=True,
    help="Quantization mode; auto tries them all and keeps the best within the budget.",
)
@click.option("--calibration", type=click.Path(path_type=Path), help="Representative inputs.")
@click.option("--eval", "evaluation", type=click.Path(path_type=Path), help="Validation data.")
@click.option("--max-accuracy-drop", type=float, default=0.01, show_default=True)
@click.option("--name", help="Model name (default: from SRC).")
@click.option("--version", default="0.1.0", show_default=True, help="Semver version.")
@click.option("--labels", type=click.Path(path_type=Path), help="Class names, one per line.")
@click.option("--signing-key", type=click.Path(path_type=Path), help="Ed25519 private key.")
@click.option("--allow-tf-ops", is_flag=True, help="Allow TF Select (Flex) ops.")
@click.option(
    "--objective",
    type=click.Choice(["size", "latency"]),
    default="size",
    show_default=True,
    help="With auto: keep the smallest, or the fastest on this machine.",
)
@click.option("--require-integer", is_flag=True, help="With auto: full-integer int8 only.")
@click.option("--layer-report", type=click.Path(path_type=Path), help="Per-layer int8 error CSV.")
@click.option("--runs", "bench_runs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Interpreter threads for validation and benchmark.",
)
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@json_option
@debug_option
@handles_errors
def convert(as_json: bool, **kwargs: Any) -> None:
    """Convert SRC (.keras, .h5 or a SavedModel folder) into a TFLite bundle."""
    from toolchain.console import ConsoleProgress, convert_json, print_convert_summary
    from toolchain.convert import ConvertOptions, convert_model

    options = ConvertOptions(**kwargs)
    progress = ConsoleProgress(stderr)
    result = convert_model(options, progress)
    if as_json:
        click.echo(json.dumps(convert_json(result)))
    else:
        print_convert_summary(stdout, result)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--public-key",
    "public_keys",
    type=click.Path(path_type=Path),
    multiple=True,
    required=True,
    help="A trusted publisher key (.pub); may be given more than once.",
)
@debug_option
@handles_errors
def verify(bundle: Path, public_keys: tuple[Path, ...], debug: bool) -> None:
    """Exit 0 only if the manifest is signed by a trusted key and the model matches it."""
    if not (bundle / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{bundle} is not a bundle (no {MANIFEST_FILE} in it)")
    trusted: list[TrustedKey] = [load_public_key(p) for p in public_keys]
    try:
        signed, signature = verify_bundle(bundle, trusted)
    except ManifestError as exc:
        raise ArtifactError(f"{bundle}: {exc}") from None
    m = signed.manifest
    stdout.print(
        f"OK {m.name} {m.version}: {m.model.path} sha256 {m.model.sha256[:16]}…, "
        f"{m.model.size} bytes, signed by key {signature.keyid[:16]}"
    )


def _model_path(target: Path) -> tuple[Path, SignedManifest | None]:
    if target.is_dir():
        try:
            signed = read_manifest(target)
        except ManifestError as exc:
            raise ArtifactError(f"{target}: {exc}") from None
        return target / signed.manifest.model.path, signed
    if not target.exists():
        raise ArtifactError(f"{target} does not exist")
    return target, None


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@json_option
@debug_option
@handles_errors
def inspect(target: Path, as_json: bool, debug: bool) -> None:
    """Inputs, outputs, quantization, ops and size of a bundle or a .tflite file."""
    from toolchain.console import print_model_info
    from toolchain.model_info import read_model_info

    path, signed = _model_path(target)
    info = read_model_info(path)
    if as_json:
        out = info.to_dict()
        if signed is not None:
            from protocol.schema import encode

            out["manifest"] = encode(signed.manifest)
            out["signatures"] = [s.keyid for s in signed.signatures]
        click.echo(json.dumps(out))
    else:
        print_model_info(stdout, info, signed, str(path))


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="Interpreter threads.")
@json_option
@debug_option
@handles_errors
def bench(
    target: Path, *, runs: int, warmup: int, threads: int | None, as_json: bool, debug: bool
) -> None:
    """Latency percentiles, throughput and peak memory of a bundle or a .tflite file."""
    from toolchain.bench import benchmark
    from toolchain.console import print_bench
    from toolchain.model_info import read_model_info

    path, _ = _model_path(target)
    info = read_model_info(path)  # a clear error for a file that is not a model
    runtime = "tensorflow" if info.flex_ops else None
    with stderr.status(f"Benchmarking {path.name} ({runs} runs)"):
        result = benchmark(path, runs=runs, warmup=warmup, threads=threads, runtime=runtime)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        print_bench(stdout, result, str(path))


def main() -> None:
    cli(prog_name="edge-convert")


if __name__ == "__main__":
    main()

"""`fleet drift ...` and the reference profile of `fleet models push --reference DIR`.

Rules this module enforces:

- **The reference profile is computed on the operator's machine**, by running the very model
  file being pushed with ONNX Runtime on the reference inputs, before the bundle is signed; the
  controller and the devices only ever read it from the signed manifest.
- **Reference folders use the traffic layout** of `fleet agent run --traffic DIR`: one sub-folder
  per request holding `<input>.npy` for each input, or, for a one-input model, any `*.npy` files
  (one request each, in name order; a file may hold a batch along its first dim). Arrays are cast
  to the input's dtype. At most `MAX_REFERENCE_FILES` requests are read.
- **Pictures stand in for arrays** of an image-like input (`<input>.png` in a sub-folder, or any
  image file in the folder of a one-input model): converted to the input's layout, size and
  dtype by `fleet.cli.images` (float inputs scaled to [0, 1], then `--reference-mean/-std`).
- `fleet drift ls` shows the controller's view (`GET /api/v1/drift`): per device, per label group
  and per model version, the worst feature and whether it is drifting; `-o json` for scripts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fleet.cli.client import Client, CliError, console, emit_json, table

if TYPE_CHECKING:  # numpy and the core load only when a profile is built: `fleet --help` stays fast
    import numpy as np

    from fleet.core.manifest import Manifest

MAX_REFERENCE_FILES = 10_000

drift_app = typer.Typer(help="Input and output drift of serving models against their reference profiles.",
                        no_args_is_help=True)


# ---------------------------------------------------------------------------------------------
# Reference profiles
# ---------------------------------------------------------------------------------------------


def _reference_requests(folder: Path, manifest: Manifest, *, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> list[dict[str, np.ndarray]]:
    import numpy as np

    from fleet.cli.images import image_tensor, is_image

    if not folder.is_dir():
        raise CliError(f"--reference {folder} is not a directory of .npy or image files", code=2)
    specs = {s.name: s for s in manifest.inputs}
    dtypes = {name: np.dtype(spec.dtype) for name, spec in specs.items()}
    names = sorted(dtypes)

    def usable(path: Path) -> bool:
        return path.is_file() and (path.suffix == ".npy" or is_image(path))

    def load(path: Path, name: str) -> np.ndarray:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return image_tensor(path, specs[name], mean=mean, std=std)

    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    requests: list[dict[str, np.ndarray]] = []
    try:
        if subdirs:
            for sub in subdirs[:MAX_REFERENCE_FILES]:
                found: dict[str, Path] = {}
                for f in sorted(sub.iterdir()):
                    if usable(f):
                        found.setdefault(f.stem, f)  # `.npy` sorts before the image suffixes
                missing = [n for n in names if n not in found]
                if missing:
                    raise CliError(f"reference request {sub} lacks {', '.join(m + '.npy' for m in missing)} "
                                   "(or an image of that name)", code=2)
                requests.append({n: load(found[n], n) for n in names})
        elif len(names) == 1:
            files = sorted(f for f in folder.iterdir() if usable(f))[:MAX_REFERENCE_FILES]
            requests = [{names[0]: load(f, names[0])} for f in files]
        else:
            raise CliError(
                f"the model has {len(names)} inputs: put each reference request in its own sub-folder of {folder} "
                f"holding {', '.join(n + '.npy' for n in names)}", code=2)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the reference data in {folder}: {exc}", code=2) from exc
    if not requests:
        raise CliError(f"--reference {folder} holds no .npy or image files", code=2)
    return [{n: np.asarray(a).astype(dtypes[n], copy=False) for n, a in r.items()} for r in requests]


def reference_profile(model_file: Path, reference_dir: Path, manifest: Manifest, *,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> dict[str, Any]:
    """Run `model_file` on the reference inputs and profile inputs and outputs (see `fleet.core.profile`)."""
    import onnxruntime as ort

    from fleet.core.errors import FleetError
    from fleet.core.profile import profile_from_requests

    requests = _reference_requests(reference_dir, manifest, mean=mean, std=std)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [s.name for s in manifest.outputs]

    def runs() -> Iterator[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]:
        for i, inputs in enumerate(requests):
            try:
                outputs = session.run(names, dict(inputs))
            except Exception as exc:
                raise CliError(f"the model cannot run reference request {i} ({exc}): check its shape and dtype",
                               code=2) from exc
            yield inputs, dict(zip(names, outputs, strict=True))

    try:
        return profile_from_requests(manifest, runs(), source="reference")
    except FleetError as exc:
        raise CliError(f"cannot build the reference profile: {exc}", code=2) from exc


def add_reference_profile(bundle_path: Path, manifest: Manifest, model_files: Mapping[str, Path],
                          reference_dir: Path, *, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None) -> Manifest:
    """Rebuild the bundle at `bundle_path` with the reference profile of the portable model added."""
    from fleet.core.bundle import build_bundle

    model_file = model_files.get("any") or next(iter(model_files.values()))
    profile = reference_profile(Path(model_file), reference_dir, manifest, mean=mean, std=std)
    return build_bundle(
        bundle_path, name=manifest.name, version=manifest.version, task=manifest.task, model_files=model_files,
        inputs=manifest.inputs, outputs=manifest.outputs, release=manifest.release,
        class_names=manifest.class_names, description=manifest.description, profile=profile,
        outputs_layout=manifest.outputs_layout, created_at=manifest.created_at,
    )


# ---------------------------------------------------------------------------------------------
# fleet drift ls
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def _flag(entry: Mapping[str, Any]) -> str:
    if entry.get("drifting"):
        return "DRIFTING"
    return "ok" if entry.get("eligible") else "few samples"


@drift_app.command("ls")
def drift_ls(
    *,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    version: Annotated[str | None, typer.Option(help="Only this version of the model.")] = None,
    group_by: Annotated[str | None, typer.Option("--group-by", help="Device label whose values form groups.")] = None,
    since: Annotated[str | None, typer.Option(help="Time window, e.g. 10m or 1h (default: the controller's).")] = None,
    controller: Annotated[str | None, typer.Option("--controller", "-c", envvar="FLEET_URL",
                                                   help="Controller REST URL.")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Output format: table or json.")] = "table",
) -> None:
    """Drift of serving models per device, per label group and per version, and which are drifting."""
    if output not in ("table", "json"):
        raise CliError("--output must be 'table' or 'json'", code=2)
    params: dict[str, Any] = {k: v for k, v in (("model", model), ("version", version), ("group_by", group_by))
                              if v}
    if since:
        from fleet.cli.main import parse_duration

        params["since_s"] = parse_duration(since)
    data = Client(controller).get("/api/v1/drift", params=params)
    if output == "json":
        emit_json(data)
        return
    threshold = data.get("psi_threshold")
    console.print(f"drift over the last {_fmt(float(data.get('since_s', 0)) / 60)} min; drifting when max PSI >= "
                  f"{threshold} with >= {data.get('min_samples')} samples")

    # Few columns so that an 80-column terminal shows them whole; KS, JS and every feature are in -o json.
    def rows(entries: list[dict[str, Any]], key: str | None) -> list[list[Any]]:
        return [[*([e.get(key)] if key else []), f"{e.get('model')}:{e.get('version', '')}", _flag(e),
                 e.get("samples"), _fmt(e.get("max_psi")), e.get("top_feature"), e.get("profile_source", "")]
                for e in entries]

    columns = ["model", "state", "samples", "max psi", "top feature", "profile"]
    if not data.get("devices"):
        console.print("no drift reported in this window (are the serving models receiving traffic?)")
        return
    table("devices", ["device", *columns], rows(data["devices"], "device_id"))
    if data.get("groups"):
        table(f"groups by {data.get('group_by')}", ["group", *columns], rows(data["groups"], "group"))
    table("versions", columns, rows(data.get("versions", []), None))

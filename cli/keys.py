"""`fleet keys`: the operator's signing keys and the root metadata that says which of them devices trust.

The key directory (`--keys-dir`, FLEET_KEYS_DIR) holds named Ed25519 key pairs, `NAME.key`
(private, 0600) and `NAME.pub`, plus `root.json`, a copy of the controller's current root. The
default setup is one key, `release`, that is the only root and targets key (1-of-1). Larger
setups give the root and targets roles several keys and a threshold each; root changes are
signed here by the local keys that the old and new root trust, and refused here, before any
upload, when those signatures do not meet both roots' thresholds (devices would refuse them).
Private keys never leave this machine: only signed metadata is uploaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from securesystemslib.signer import Key, Signer
from tuf.api.metadata import Metadata, Root

from fleet.cli.client import Client, CliError, console, emit_json, table
from fleet.core import trust as tr
from fleet.core.errors import FleetError

KEYS_DIR = Path(os.environ.get("FLEET_KEYS_DIR", Path.home() / ".config" / "fleet" / "keys"))
KeysOpt = Annotated[Path, typer.Option("--keys-dir", envvar="FLEET_KEYS_DIR", help="Where the signing keys live.")]
_ControllerOpt = Annotated[
    str | None,
    typer.Option("--controller", "-c", envvar="FLEET_URL", help="Controller REST URL.",
                 show_default="http://127.0.0.1:8080"),
]
_OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output format: table or json.")]
RoleOpt = Annotated[str, typer.Option("--role", help="The role: root or targets.")]
SignWithOpt = Annotated[list[str] | None, typer.Option(
    "--sign-with", help="Local key NAME to sign the new root with (repeatable; default: every local key the old or "
                        "new root trusts for the root role).")]
# No dots: `NAME.key` / `NAME.pub` must be unambiguous.
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RELEASE = "release"
ROOT_CACHE = "root.json"

keys_app = typer.Typer(
    help="Signing keys, kept on the operator's machine, and the root metadata that says which ones devices trust.",
    no_args_is_help=True,
)


def _json(output: str) -> bool:
    if output not in ("table", "json"):
        raise CliError("--output must be 'table' or 'json'", code=2)
    return output == "json"


# -- local keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalKey:
    name: str
    public: Key
    private_path: Path | None

    @property
    def keyid(self) -> str:
        return self.public.keyid


def _check_name(name: str) -> str:
    if not KEY_NAME_RE.match(name):
        raise CliError(f"key name {name!r} must be 1-64 letters, digits, '_' or '-' (no dots)", code=2)
    return name


def local_keys(keys_dir: Path) -> list[LocalKey]:
    """Every key pair (or lone public key) in the key directory, by name."""
    if not keys_dir.is_dir():
        return []
    out = []
    for pub in sorted(keys_dir.glob("*.pub")):
        if not KEY_NAME_RE.match(pub.stem):
            continue
        private = pub.with_suffix(".key")
        out.append(LocalKey(pub.stem, tr.load_public_key(pub), private if private.exists() else None))
    return out


def _local(keys_dir: Path, name: str) -> LocalKey:
    _check_name(name)
    pub = keys_dir / f"{name}.pub"
    if not pub.exists():
        names = ", ".join(k.name for k in local_keys(keys_dir)) or "none"
        raise CliError(f"no key named {name!r} in {keys_dir} (local keys: {names}); create it with "
                       f"`fleet keys create {name}`", code=2)
    private = keys_dir / f"{name}.key"
    return LocalKey(name, tr.load_public_key(pub), private if private.exists() else None)


def _public_key(keys_dir: Path, ref: str) -> Key:
    """A key given as a local key name or as a path to a `.pub` PEM file (someone else's key)."""
    if KEY_NAME_RE.match(ref) and (keys_dir / f"{ref}.pub").exists():
        return _local(keys_dir, ref).public
    path = Path(ref)
    if path.is_file():
        return tr.load_public_key(path)
    raise CliError(f"{ref!r} is neither a key in {keys_dir} nor a public key file", code=2)


def _signer(key: LocalKey) -> Signer:
    if key.private_path is None:
        raise CliError(f"key {key.name!r} has only its public half here ({key.name}.pub); it cannot sign", code=2)
    return tr.load_signer(key.private_path)


def _roles_of(root: Root, keyid: str) -> list[str]:
    return [name for name, role in root.roles.items() if keyid in role.keyids]


def _parse_root(data: bytes) -> Root:
    md: Metadata[Any] = Metadata.from_bytes(data)
    if not isinstance(md.signed, Root):
        raise CliError("the controller's root.json is not root metadata")
    return md.signed


# -- the controller's root ------------------------------------------------------------------------


def ensure_root(client: Client, keys_dir: Path) -> bytes:
    """The controller's root metadata; made from the `release` key and uploaded on first use."""
    existing = client.get_optional("/tuf/root.json")
    if existing is not None:
        _cache_root(keys_dir, bytes(existing))
        return bytes(existing)
    release = keys_dir / f"{RELEASE}.key"
    if not release.exists():
        raise CliError(f"the controller has no root yet and there is no release key in {keys_dir}: "
                       "run `fleet keys init` first")
    online = client.get("/api/v1/trust/online-key")
    signer = tr.load_signer(release)
    root = tr.new_root(signer, tr.load_public_key(keys_dir / f"{RELEASE}.pub"),
                       tr.load_public_key(online["public_key_pem"]))
    client.post("/api/v1/trust/root", content=root, headers={"content-type": "application/json"})
    _cache_root(keys_dir, root)
    return root


def _cache_root(keys_dir: Path, root: bytes) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (keys_dir / ROOT_CACHE).write_bytes(root)


def _current_root(client: Client, keys_dir: Path) -> bytes:
    existing = client.get_optional("/tuf/root.json")
    if existing is None:
        raise CliError("the controller has no root yet: create it with `fleet keys init --controller URL ...` or "
                       "`fleet keys export-root` first")
    _cache_root(keys_dir, bytes(existing))
    return bytes(existing)


def targets_signers(keys_dir: Path, root_bytes: bytes, names: list[str] | None) -> list[Signer]:
    """The keys that sign targets: the named ones, or every local key the root trusts for targets."""
    root = _parse_root(root_bytes)
    role = root.roles[tr.TARGETS]
    if names:
        keys = [_local(keys_dir, n) for n in names]
    else:
        keys = [k for k in local_keys(keys_dir) if k.keyid in role.keyids and k.private_path is not None]
        if not keys:
            raise CliError(
                f"no local key in {keys_dir} is a targets key of root v{root.version} (targets keys: "
                f"{', '.join(k[:16] for k in role.keyids)}); pass --key NAME or copy a targets key here")
    for key in keys:
        if key.keyid not in role.keyids:
            raise CliError(f"key {key.name!r} ({key.keyid[:16]}) is not a targets key of root v{root.version}")
    if len({k.keyid for k in keys}) < role.threshold:
        raise CliError(f"targets need {role.threshold} signatures by targets keys of root v{root.version}; "
                       f"only {len(keys)} local key(s) given ({', '.join(k.name for k in keys)})")
    return [_signer(k) for k in keys]


def publish_policy(client: Client, keys_dir: Path, model: str, min_release: int, key_names: list[str] | None) -> int:
    """Sign `model`'s minimum release into targets and upload them; the new targets version."""
    root = ensure_root(client, keys_dir)
    signers = targets_signers(keys_dir, root, key_names)
    current = client.get_optional("/api/v1/trust/targets")
    try:
        targets = tr.set_min_release(current, root, signers, model=model, min_release=min_release)
    except FleetError as exc:
        raise CliError(f"cannot sign the policy: {exc}", code=2) from exc
    result = client.post("/api/v1/trust/targets", content=targets, headers={"content-type": "application/json"})
    return int(result["version"])


def change_root(
    client: Client,
    keys_dir: Path,
    sign_with: list[str] | None,
    *,
    add_keys: dict[str, list[Key]] | None = None,
    revoke_keys: dict[str, list[str]] | None = None,
    thresholds: dict[str, int] | None = None,
    expires_days: int = 365,
) -> dict[str, Any]:
    """Make, sign, check and upload the next root; re-sign targets when the targets role changed.

    The controller's current online key always goes into the new root, so rotating the online
    key is: restart the controller with its new key, then `fleet keys rotate-root`.
    """
    current_bytes = _current_root(client, keys_dir)
    current = _parse_root(current_bytes)
    online = tr.load_public_key(client.get("/api/v1/trust/online-key")["public_key_pem"])
    online_change = online if online.keyid not in current.roles[tr.TIMESTAMP].keyids else None
    try:
        unsigned = tr.next_root(
            current_bytes, [], add_keys=add_keys, revoke_keys=revoke_keys, thresholds=thresholds,
            online_public=online_change, expires_days=expires_days, require_threshold=False,
        )
    except FleetError as exc:
        raise CliError(str(exc), code=2) from exc
    new = _parse_root(unsigned)
    if sign_with:
        signing = [_local(keys_dir, n) for n in sign_with]
    else:
        trusted = set(current.roles[tr.ROOT].keyids) | set(new.roles[tr.ROOT].keyids)
        signing = [k for k in local_keys(keys_dir) if k.keyid in trusted and k.private_path is not None]
    signed = tr.sign_root(unsigned, [_signer(k) for k in signing])
    status = tr.root_signatures(signed, current_bytes)
    if not status.ok:
        names = ", ".join(k.name for k in signing) or "no keys"
        raise CliError(f"refusing to upload: {status.problem()} (signed here by {names}); sign with more root keys "
                       "(--sign-with NAME, repeatable) so that both the old and the new root's thresholds are met")

    targets_changed = (current.roles[tr.TARGETS].keyids != new.roles[tr.TARGETS].keyids
                       or current.roles[tr.TARGETS].threshold != new.roles[tr.TARGETS].threshold)
    published = client.get_optional("/api/v1/trust/targets") if targets_changed else None
    resigned: bytes | None = None
    if published is not None:
        # Check before the root goes up: a new root whose targets nobody here can re-sign would
        # leave every device refusing every bundle.
        signers = targets_signers(keys_dir, signed, None)
        resigned = tr.resign_targets(published, current_bytes, signed, signers)
    client.post("/api/v1/trust/root", content=signed, headers={"content-type": "application/json"})
    _cache_root(keys_dir, signed)
    result: dict[str, Any] = {
        "version": new.version,
        "roles": {name: {"keyids": list(role.keyids), "threshold": role.threshold} for name, role in new.roles.items()},
        "signed_by": [k.name for k in signing],
        "online_key_replaced": online_change is not None,
        "targets_version": None,
    }
    if resigned is not None:
        result["targets_version"] = client.post(
            "/api/v1/trust/targets", content=resigned, headers={"content-type": "application/json"})["version"]
    return result


def _print_change(result: dict[str, Any], output: str) -> None:
    if _json(output):
        emit_json(result)
        return
    roles = result["roles"]
    console.print(f"root v{result['version']} uploaded, signed by {', '.join(result['signed_by'])}: "
                  + "; ".join(f"{r} {roles[r]['threshold']}-of-{len(roles[r]['keyids'])}" for r in ("root", "targets")))
    if result["online_key_replaced"]:
        console.print("the controller's new online key now signs snapshot and timestamp")
    if result["targets_version"] is not None:
        console.print(f"targets re-signed with the new targets key(s) as v{result['targets_version']}")


# -- commands ---------------------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    keys_dir: KeysOpt = KEYS_DIR,
    force: Annotated[bool, typer.Option(help="Replace an existing release key.")] = False,
    root_keys: Annotated[int, typer.Option(help="With more than 0: create keys root-1..N for the root role.")] = 0,
    root_threshold: Annotated[int, typer.Option(help="Root-key signatures a new root needs.")] = 1,
    targets_keys: Annotated[int, typer.Option(help="With more than 0: create keys targets-1..N for targets.")] = 0,
    targets_threshold: Annotated[int, typer.Option(help="Targets-key signatures a targets.json needs.")] = 1,
    controller: _ControllerOpt = None,
    output: _OutputOpt = "table",
) -> None:
    """Create the signing keys (Ed25519; private files mode 0600).

    Without options: one `release` key, the root and targets key (1-of-1); the root is made on the
    first push. With --root-keys/--targets-keys: keys root-1..N and targets-1..M, and a root with
    the given thresholds, signed by the root keys and uploaded to the controller now.
    """
    as_json = _json(output)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if root_keys <= 0 and targets_keys <= 0:
        path = keys_dir / f"{RELEASE}.key"
        if path.exists() and not force:
            raise CliError(f"{path} already exists; pass --force to replace it (bundles signed with it stay valid "
                           "only for agents provisioned with the old root)")
        if path.exists():
            path.unlink()
            (keys_dir / f"{RELEASE}.pub").unlink(missing_ok=True)
        keyid = tr.generate_key_pair(path)
        if as_json:
            emit_json({"keys": [{"name": RELEASE, "keyid": keyid}]})
        else:
            console.print(f"release key [bold]{keyid[:16]}[/] written to {path} (private, 0600) and "
                          f"{keys_dir / 'release.pub'}")
        return
    if root_keys <= 0 or targets_keys <= 0:
        raise CliError("--root-keys and --targets-keys go together (each at least 1)", code=2)
    for count, threshold, what in ((root_keys, root_threshold, "root"), (targets_keys, targets_threshold, "targets")):
        if not 1 <= threshold <= count:
            raise CliError(f"--{what}-threshold must be between 1 and --{what}-keys ({count})", code=2)
    client = Client(controller)
    if client.get_optional("/tuf/root.json") is not None:
        raise CliError("the controller already has a root; change it with "
                       "`fleet keys add|revoke|threshold|rotate-root`")
    names = [f"root-{i}" for i in range(1, root_keys + 1)] + [f"targets-{i}" for i in range(1, targets_keys + 1)]
    existing = [n for n in names if (keys_dir / f"{n}.key").exists()]
    if existing:
        raise CliError(f"keys {', '.join(existing)} already exist in {keys_dir}; refusing to overwrite them")
    for name in names:
        tr.generate_key_pair(keys_dir / f"{name}.key")
    made = {k.name: k for k in local_keys(keys_dir)}
    roots = [made[f"root-{i}"] for i in range(1, root_keys + 1)]
    targets = [made[f"targets-{i}"] for i in range(1, targets_keys + 1)]
    online = tr.load_public_key(client.get("/api/v1/trust/online-key")["public_key_pem"])
    root = tr.make_root(
        root_keys=[k.public for k in roots], root_threshold=root_threshold,
        targets_keys=[k.public for k in targets], targets_threshold=targets_threshold,
        online_public=online, signers=[_signer(k) for k in roots],
    )
    client.post("/api/v1/trust/root", content=root, headers={"content-type": "application/json"})
    _cache_root(keys_dir, root)
    if as_json:
        emit_json({"keys": [{"name": k.name, "keyid": k.keyid} for k in (*roots, *targets)],
                   "root": {"version": 1, "root_threshold": root_threshold, "targets_threshold": targets_threshold}})
    else:
        console.print(f"created {', '.join(names)} in {keys_dir}; root v1 (root {root_threshold}-of-{root_keys}, "
                      f"targets {targets_threshold}-of-{targets_keys}) uploaded. Keep the root keys offline, apart.")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="Key name: NAME.key / NAME.pub.")],
                keys_dir: KeysOpt = KEYS_DIR, output: _OutputOpt = "table") -> None:
    """Create a named Ed25519 key pair (not trusted by anything until `fleet keys add` names it)."""
    as_json = _json(output)
    _check_name(name)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyid = tr.generate_key_pair(keys_dir / f"{name}.key")
    if as_json:
        emit_json({"name": name, "keyid": keyid})
    else:
        console.print(f"key [bold]{name}[/] {keyid[:16]} written to {keys_dir / (name + '.key')} (private, 0600)")


@keys_app.command("ls")
def keys_ls(keys_dir: KeysOpt = KEYS_DIR, controller: _ControllerOpt = None, output: _OutputOpt = "table") -> None:
    """List local keys and, for each, the roles of the controller's current root that trust it."""
    as_json = _json(output)
    source = "controller"
    try:
        data = Client(controller).get_optional("/tuf/root.json")
    except CliError:
        data, source = None, "none"
    if data is None and (keys_dir / ROOT_CACHE).exists():
        data, source = (keys_dir / ROOT_CACHE).read_bytes(), "cache"
    elif data is None:
        source = "none"
    root = _parse_root(bytes(data)) if data is not None else None
    rows: list[dict[str, Any]] = [
        {"name": k.name, "keyid": k.keyid, "private": k.private_path is not None,
         "roles": _roles_of(root, k.keyid) if root is not None else []} for k in local_keys(keys_dir)]
    if as_json:
        emit_json({"keys": rows, "root_version": root.version if root else None, "root_source": source})
        return
    title = f"keys in {keys_dir}" + (f" (roles of root v{root.version}, from the {source})" if root else
                                     " (no root known)")
    table(title, ["name", "keyid", "private", "roles"],
          [[r["name"], r["keyid"][:16], "yes" if r["private"] else "no", ", ".join(r["roles"]) or "-"] for r in rows])


@keys_app.command("show")
def keys_show(keys_dir: KeysOpt = KEYS_DIR, output: _OutputOpt = "table") -> None:
    """Show the release key's id and files."""
    pub = keys_dir / f"{RELEASE}.pub"
    if not pub.exists():
        raise CliError(f"no release key in {keys_dir}: run `fleet keys init`")
    key = tr.load_public_key(pub)
    data = {"keyid": key.keyid, "private": str(keys_dir / f"{RELEASE}.key"), "public": str(pub)}
    if _json(output):
        emit_json(data)
    else:
        table(None, ["keyid", "private key", "public key"], [[data["keyid"], data["private"], data["public"]]])


@keys_app.command("export-root")
def keys_export_root(
    out: Annotated[Path, typer.Option("--out", help="Where to write root.json for provisioning agents.")] = Path(
        "root.json"),
    keys_dir: KeysOpt = KEYS_DIR,
    controller: _ControllerOpt = None,
) -> None:
    """Write the root metadata agents are provisioned with (creates it on the controller if needed)."""
    root = ensure_root(Client(controller), keys_dir)
    out.write_bytes(root)
    console.print(f"root metadata written to {out}: provision agents with --trust-root {out}")


def _role(role: str) -> str:
    if role not in tr.OFFLINE_ROLES:
        raise CliError(f"--role must be 'root' or 'targets', got {role!r}", code=2)
    return role


@keys_app.command("add")
def keys_add(
    key: Annotated[str, typer.Argument(help="A local key NAME or a path to a public key (.pub) file.")],
    role: RoleOpt,
    sign_with: SignWithOpt = None,
    keys_dir: KeysOpt = KEYS_DIR,
    controller: _ControllerOpt = None,
    output: _OutputOpt = "table",
) -> None:
    """Trust KEY for a role in the next root version (signed here, then uploaded).

    Adding a targets key re-signs the published targets so devices keep working.
    """
    _role(role)
    _print_change(change_root(Client(controller), keys_dir, sign_with,
                              add_keys={role: [_public_key(keys_dir, key)]}), output)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="A local key NAME, or a key id (or a unique prefix of one).")],
    role: RoleOpt,
    sign_with: SignWithOpt = None,
    keys_dir: KeysOpt = KEYS_DIR,
    controller: _ControllerOpt = None,
    output: _OutputOpt = "table",
) -> None:
    """Stop trusting KEY for a role in the next root version (signed here, then uploaded).

    Revoking a targets key re-signs the published targets with the remaining local targets keys.
    """
    _role(role)
    client = Client(controller)
    root = _parse_root(_current_root(client, keys_dir))
    if KEY_NAME_RE.match(key) and (keys_dir / f"{key}.pub").exists():
        keyid = _local(keys_dir, key).keyid
    else:
        matches = [k for k in root.roles[role].keyids if k.startswith(key.lower())]
        if len(matches) != 1:
            raise CliError(f"{key!r} names {'no' if not matches else 'more than one'} {role} key of root "
                           f"v{root.version}; give a local key name or a longer key id", code=2)
        keyid = matches[0]
    _print_change(change_root(client, keys_dir, sign_with, revoke_keys={role: [keyid]}), output)


@keys_app.command("threshold")
def keys_threshold(
    n: Annotated[int, typer.Argument(help="How many of the role's keys must sign.")],
    role: RoleOpt,
    sign_with: SignWithOpt = None,
    keys_dir: KeysOpt = KEYS_DIR,
    controller: _ControllerOpt = None,
    output: _OutputOpt = "table",
) -> None:
    """Set a role's signature threshold in the next root version (signed here, then uploaded)."""
    _role(role)
    _print_change(change_root(Client(controller), keys_dir, sign_with, thresholds={role: n}), output)


@keys_app.command("rotate-root")
def keys_rotate_root(
    sign_with: SignWithOpt = None,
    expires_days: Annotated[int, typer.Option(help="Days until the new root expires.")] = 365,
    keys_dir: KeysOpt = KEYS_DIR,
    controller: _ControllerOpt = None,
    output: _OutputOpt = "table",
) -> None:
    """Make the next root version: a fresh expiry, and the controller's current online key.

    Run it after the controller got a new online key (replace its keys/online.key and restart
    it): devices trust the new key once this root reaches them, and refuse the old one.
    """
    _print_change(change_root(Client(controller), keys_dir, sign_with, expires_days=expires_days), output)

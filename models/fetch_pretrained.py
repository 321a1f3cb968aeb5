"""Fetch every pretrained part the configured members need into one folder, for a GPU machine
without a route to the model hubs.

On a connected machine (the full members of configs/ensemble.yaml and the split's encoder):
  python -m models.fetch_pretrained --out pretrained
  python -m models.fetch_pretrained --out pretrained --members sta,sjedd
Copy the folder to the offline machine, then there:
  python -m models.fetch_pretrained --out pretrained --check     # per member: present, missing
  bash run_all.sh --pretrained pretrained                         # every stage reads the folder
or member by member, with the overrides the fetch printed (also in pretrained/overrides/<member>.txt):
  python train.py --config configs/members/sta.yaml --fold all model.pretrained="pretrained/open_clip/..."

Under --out: timm/<name>/<file> and open_clip/<name>-<tag>/<file> as the hubs serve them (checked
against the SHA-256 the hub gives: the LFS digest on Hugging Face, the digest in OpenAI's URLs, the
digest prefix in torch.hub file names), manifest.json (each file's hub, revision and SHA-256), and
overrides/<member>.txt and overrides/data.txt (one `key=value` per line, pointing at the files).
A file already in the folder with its recorded SHA-256 is not downloaded again, so rerunning the
command on the offline machine with the folder's new path rewrites the overrides without a hub.
Parts a config already gives as local files, and face-recognition networks (dlib's files come
with the face_recognition_models package, a torch.export archive is the user's own), are checked,
never downloaded.

--check downloads nothing: per member, one line saying which parts are present (in the folder,
as a local file, or in the hub caches timm and open_clip read) and which are missing.

Exit status: 0 every part present; 1 a part missing or failing its download or checksum; 2 a bad
config or member name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from core.checkpoint import CheckpointError
from core.config import ConfigError, load_config
from core.io import write_json, write_text
from core.log import get_logger
from models.pretrained_parts import DLIB, OPEN_CLIP, TIMM, TORCH_EXPORT, Part, data_parts, member_parts
from models.provenance import sha256_of

log = get_logger("fetch_pretrained")

MANIFEST = "manifest.json"
OVERRIDES = "overrides"
DATA_OWNER = "data"
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order on the Hugging Face hub
_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's, safetensors first
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.\w+$")  # torch.hub names: <name>-<sha256 prefix>.<ext>


@dataclass(frozen=True)
class Remote:
    """Where the hub serves a part: a Hugging Face repository (`repo`, candidate `files` in order,
    `revision`) or a URL; once resolved, the one `files[0]`, the commit and the expected SHA-256
    (or a prefix of it)."""

    folder: str
    files: tuple[str, ...]
    repo: str | None = None
    revision: str | None = None
    url: str | None = None
    sha256: str | None = None


def remote_of(part: Part) -> Remote:
    """The hub location of a timm or open_clip part, from the libraries' own pretrained configs."""
    if part.kind == TIMM:
        import timm

        cfg = timm.models.get_pretrained_cfg(part.name)
        if cfg is None:
            raise ConfigError(f"{part.owner} {part.describe()}: timm knows no pretrained weights by that name")
        folder = f"timm/{part.name}"
        if cfg.hf_hub_id:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _TIMM_FILES
            return Remote(folder, files, repo, revision or None)
        return Remote(folder, (Path(cfg.url).name,), url=cfg.url, sha256=_url_digest(cfg.url))
    import open_clip

    cfg = open_clip.get_pretrained_cfg(part.name, part.tag)
    if not cfg:
        raise ConfigError(f"{part.owner} {part.describe()}: open_clip knows no such pretrained tag")
    folder = f"open_clip/{part.name}-{part.tag}"
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        safe = f"{Path(filename).stem}.safetensors" if filename else None
        return Remote(folder, (safe, filename) if filename else _CLIP_FILES, repo)
    return Remote(folder, (Path(cfg["url"]).name,), url=cfg["url"], sha256=_url_digest(cfg["url"]))


def _url_digest(url: str) -> str | None:
    """The SHA-256 (or its prefix) a download URL carries: OpenAI's in the folder name, torch.hub's
    after the last dash of the file name."""
    if "openaipublic" in url:
        return url.split("/")[-2]
    found = _HASH_IN_NAME.search(url)
    return found.group(1) if found else None


class Hub:
    """The network side of the fetch (tests replace it): resolve a remote to one file, its commit and
    digest; download it into a folder; find it in the local caches timm and open_clip read."""

    def resolve(self, remote: Remote) -> Remote:
        if remote.url:
            return remote
        from huggingface_hub import HfApi

        info = HfApi().model_info(remote.repo, revision=remote.revision, files_metadata=True)
        served = {s.rfilename: s for s in info.siblings or []}
        for name in remote.files:
            if name in served:
                lfs = served[name].lfs
                return replace(remote, files=(name,), revision=info.sha, sha256=lfs.sha256 if lfs else None)
        raise CheckpointError(f"{remote.repo}: the hub has none of {list(remote.files)}")

    def download(self, remote: Remote, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if remote.url:
            import torch

            target = folder / remote.files[0]
            torch.hub.download_url_to_file(remote.url, str(target), progress=True)
            return target
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(remote.repo, remote.files[0], revision=remote.revision, local_dir=folder))

    def cached(self, remote: Remote) -> Path | None:
        if remote.url:
            import torch

            name = Path(remote.url).name
            places = (Path(torch.hub.get_dir()) / "checkpoints" / name, Path.home() / ".cache" / "clip" / name)
            return next((p for p in places if p.is_file()), None)
        from huggingface_hub import try_to_load_from_cache

        for name in remote.files:
            found = try_to_load_from_cache(remote.repo, name, revision=remote.revision)
            if isinstance(found, str):
                return Path(found)
        return None


# --------------------------------------------------------------------------- configs and parts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.fetch_pretrained",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="pretrained", help="the folder the parts go into (default: %(default)s)")
    p.add_argument("--members", help="comma-separated members (default: `members` of the ensemble config)")
    p.add_argument("--demo", action="store_true", help="the demo members and the demo split encoder instead")
    p.add_argument("--check", action="store_true", help="say what is present and missing; download nothing")
    p.add_argument("--config-dir", default="configs/members", help="member configs (default: %(default)s)")
    p.add_argument("--ensemble-config", default="configs/ensemble.yaml", help="(default: %(default)s)")
    p.add_argument("--data-config", default="configs/data.yaml", help="for the split encoder (default: %(default)s)")
    return p.parse_args(argv)


def configured_parts(args: argparse.Namespace) -> dict[str, tuple[dict, list[Part]]]:
    """Per owner (each member, then `data`): its config and its parts."""
    if args.members:
        names = [m.strip() for m in args.members.split(",") if m.strip()]
    else:
        names = list(load_config([args.ensemble_config])["demo_members" if args.demo else "members"])
    owners = {}
    for name in names:
        cfg = load_config([Path(args.config_dir) / f"{name}.yaml"])
        owners[str(cfg.get("name", name))] = (cfg, member_parts(cfg))
    data_cfg = load_config([args.data_config])
    owners[DATA_OWNER] = (data_cfg, data_parts(data_cfg, args.demo))
    return owners


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def in_folder(out: Path, manifest: dict, hub_id: str) -> Path | None:
    """The folder's file for `hub_id`, if the manifest lists it and it is there."""
    entry = manifest.get(hub_id)
    return out / entry["file"] if entry and (out / entry["file"]).is_file() else None


def local_part_present(part: Part) -> tuple[bool, str]:
    """(present, where) for a part given as a local file, or local only (face embedders)."""
    if part.kind == DLIB:
        from data_prep.faces import EMBEDDING_FILE, FaceModelError, model_path

        try:
            return True, str(model_path(EMBEDDING_FILE, part.local))
        except FaceModelError as err:
            return False, str(err)
    if part.kind == TORCH_EXPORT and not part.local:
        return False, "loss.embedder.file is not set"
    return Path(part.local).exists(), str(part.local)


def availability(part: Part, out: Path, manifest: dict, hub: Hub) -> tuple[bool, str] | None:
    """(present, where) of a part; None for a part the config does not want."""
    if not part.wanted:
        return None
    if part.hub_id is None:
        return local_part_present(part)
    found = in_folder(out, manifest, part.hub_id)
    if found is not None:
        return True, str(found)
    cached = hub.cached(remote_of(part))
    return (True, f"hub cache {cached}") if cached else (False, "")


# --------------------------------------------------------------------------- check


def check(owners: dict[str, tuple[dict, list[Part]]], out: Path, hub: Hub) -> int:
    """One line per owner: its present and missing parts. 1 when any is missing."""
    manifest = read_manifest(out)
    missing_any = False
    for owner, (_, parts) in owners.items():
        found = [(part, availability(part, out, manifest, hub)) for part in parts]
        found = [(part, state) for part, state in found if state is not None]
        if not found:
            print(f"{owner}: nothing pretrained (every part starts from random weights)")
            continue
        present = [f"{p.describe()} at {where}" for p, (ok, where) in found if ok]
        missing = [f"{p.describe()}{f': {where}' if where else ''}" for p, (ok, where) in found if not ok]
        missing_any |= bool(missing)
        print(f"{owner}: present: {'; '.join(present) or 'none'} | missing: {'; '.join(missing) or 'none'}")
    if missing_any:
        print(f"fetch the hub parts on a connected machine: python -m models.fetch_pretrained --out {out}")
    return 1 if missing_any else 0


# --------------------------------------------------------------------------- fetch


def verify(file: Path, expected: str | None, where: str) -> str:
    """The file's SHA-256, checked against the hub's digest (or prefix) where it gives one."""
    digest = sha256_of(file)
    if expected and not digest.startswith(expected.lower()):
        file.unlink()
        raise CheckpointError(f"{where}: downloaded file's SHA-256 {digest} is not the hub's {expected}; removed")
    return digest


def fetch_one(part: Part, out: Path, manifest: dict, hub: Hub) -> Path:
    """The folder's file of a hub part: kept when present with its recorded digest, else downloaded,
    checked and recorded in `manifest`."""
    found = in_folder(out, manifest, part.hub_id)
    if found is not None and sha256_of(found) == manifest[part.hub_id]["sha256"]:
        log.info("%s: present in %s", part.hub_id, found)
        return found
    remote = hub.resolve(remote_of(part))
    where = remote.url or f"{remote.repo}/{remote.files[0]}"
    log.info("%s: downloading %s (revision %s)", part.hub_id, where, remote.revision or "-")
    file = hub.download(remote, out / remote.folder)
    digest = verify(file, remote.sha256, where)
    manifest[part.hub_id] = {
        "file": file.relative_to(out).as_posix(),
        "source": where,
        "revision": remote.revision,
        "sha256": digest,
        "hub_sha256": remote.sha256,
    }
    write_json(manifest, out / MANIFEST)  # after each file: an interrupted fetch keeps what it has
    return file


def _value(cfg: dict, key: str) -> object:
    node: object = cfg
    for name in key.split("."):
        node = node[name]
    return node


def _leaf(cfg: dict, key: str) -> bool:
    """Whether `key` (dotted) is in `cfg`: an override of a new key needs a leading `+`."""
    node: object = cfg
    for name in key.split("."):
        if not isinstance(node, dict) or name not in node:
            return False
        node = node[name]
    return True


def overrides(cfg: dict, files: dict[str, Path]) -> list[str]:
    """`key=value` overrides pointing a config's fetched parts (`files`, by section key) at their
    files. Experts are one `experts=[...]` override (a list item has no key of its own); an open_clip
    tag's QuickGELU setting travels with its file (a file cannot say it)."""
    out = []
    experts = [dict(e) for e in cfg.get("experts") or []]
    for key, file in files.items():
        section, _, index = key.partition(".")
        if section == "experts":
            experts[int(index)]["weights"] = str(file)
            continue
        leaf = "weights" if _is_timm_section(cfg, key) else "pretrained"
        out.append(f"{'' if _leaf(cfg, f'{key}.{leaf}') else '+'}{key}.{leaf}={json.dumps(str(file))}")
    if any(k.startswith("experts.") for k in files):
        out.insert(0, f"experts={json.dumps(experts)}")
    return out


def _is_timm_section(cfg: dict, key: str) -> bool:
    node = _value(cfg, key)
    return "backbone" in node or node.get("kind") == TIMM


def quick_gelu_overrides(cfg: dict, parts: Iterable[Part]) -> list[str]:
    """For an open_clip tag trained with QuickGELU, the section's `quick_gelu: true`."""
    import open_clip

    out = []
    for part in parts:
        key = f"{part.key}.quick_gelu"
        if part.kind == OPEN_CLIP and open_clip.get_pretrained_cfg(part.name, part.tag).get("quick_gelu"):
            if not _leaf(cfg, key):
                out.append(f"+{key}=true")
            elif _value(cfg, key) is not True:
                out.append(f"{key}=true")
    return out


def fetch(owners: dict[str, tuple[dict, list[Part]]], out: Path, hub: Hub) -> int:
    """Download every wanted hub part once, write the overrides per owner, print them. 1 when a
    part could not be had."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    fetched: dict[str, Path | None] = {}  # per hub id: its file, None when it could not be had
    failed = 0
    for owner, (cfg, parts) in owners.items():
        files = {}
        for part in parts:
            if part.hub_id is None:
                state = availability(part, out, manifest, hub)
                if state is not None and not state[0]:
                    print(f"{owner}: {part.describe()} missing: {state[1]} (a local part: not fetched)")
                    failed += 1
                continue
            if part.hub_id not in fetched:
                try:
                    fetched[part.hub_id] = fetch_one(part, out, manifest, hub)
                except Exception as err:  # noqa: BLE001 - hub failures come as HTTP, OS and huggingface_hub errors
                    print(f"{owner}: {part.describe()} not fetched: {type(err).__name__}: {err}", file=sys.stderr)
                    fetched[part.hub_id] = None
            if fetched[part.hub_id] is None:
                failed += 1
            else:
                files[part.key] = fetched[part.hub_id].resolve()
        lines = overrides(cfg, files) + quick_gelu_overrides(cfg, [p for p in parts if p.key in files])
        write_text("".join(f"{line}\n" for line in lines), out / OVERRIDES / f"{owner}.txt")
        wanted = sum(p.hub_id is not None for p in parts)
        print(f"{owner}: {len(files)} of {wanted} hub part(s) in {out}; overrides: {' '.join(lines) or 'none'}")
    print(f"offline: bash run_all.sh --pretrained {out}   (or append {out}/{OVERRIDES}/<member>.txt to train.py)")
    return 1 if failed else 0


def main(argv: list[str] | None = None, hub: Hub | None = None) -> int:
    args = parse_args(argv)
    try:
        owners = configured_parts(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hub = hub or Hub()
    out = Path(args.out)
    return check(owners, out, hub) if args.check else fetch(owners, out, hub)


if __name__ == "__main__":
    sys.exit(main())

"""Model loads: fetch the weights a load_model / load_model_v2 / load_vae request names, verify
and convert them on the engine side, and record the outcome in the weights store.

Sources: an http(s) URL to a single weights file (streamed to disk, size-capped; Civitai-style
URLs without an extension are named by Content-Disposition), a `.tar` archive (what sync_models
serves), a Hugging Face repo id (`owner/name`, downloaded with huggingface_hub where the machine
has internet), some files and folders of a repo (`owner/name:path,path`: only those, placed side by
side in one folder, as an IP-Adapter's weights file and the image encoder beside it), or a local
file or folder when the server allows local paths.

`run_load` never raises: the manifest ends `ready` or `failed` with a reason, and the webhook,
when given, receives the outcome.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from email.message import Message
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

from infra.catalog.weights import PIPELINE_CATEGORIES, LoadRequest, ModelEntry, WeightsStore
from infra.net import fetcher
from models.errors import BadInput

log = logging.getLogger(__name__)

HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# `owner/name:path,path`: files or folders of a repo (no absolute paths, no `..`)
_HUB_PATH = r"(?!\.\.)[\w.-]+(?:/(?!\.\.)[\w.-]+)*/?"
HUB_PATHS = re.compile(rf"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<paths>{_HUB_PATH}(?:,{_HUB_PATH})*)$")
HUB_SKIP = (".fp16.safetensors", ".non_ema.safetensors", ".ema.safetensors")  # duplicates of the main weights
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def source_kind(source: str, allow_local: bool = True) -> str:
    """'url', 'path' or 'hub' — or a BadInput that says what a valid source looks like."""
    if urlparse(source).scheme in ("http", "https"):
        return "url"
    if source.startswith("file://") or source.startswith("/"):
        if not allow_local:
            raise BadInput("url: local paths are not allowed on this server", tip="Send an http(s) URL or a repo id.")
        return "path"
    if HUB_REPO.match(source) or HUB_PATHS.match(source):
        return "hub"
    raise BadInput(
        f"url {source!r} is not a model source",
        tip="Send an http(s) URL to a .safetensors/.ckpt/.pt/.bin file, or a Hugging Face repo id like owner/name "
        "(owner/name:path,path for some of its files).",
    )


def store_precision(settings) -> str:
    """The precision a load without `revision` is stored in (setting `store_precision`; `auto`: fp16
    when this machine has a CUDA GPU, else fp32)."""
    if settings.store_precision != "auto":
        return settings.store_precision
    import torch

    return "fp16" if torch.cuda.is_available() else "fp32"


# The engine side's step of a load: verify and convert the downloaded files into the store's format
# (`infra.engine.files.convert.prepare_model`): (category or None, download, out folder, precision,
# upcast_attention, the base model's folder or None) -> the manifest facts. Passed in by whoever runs
# loads, so the catalog needs no torch.
Prepare = Callable[[str | None, Path, Path, str, bool, Path | None], dict]


def run_load(request: LoadRequest, weights: WeightsStore, settings, notify, prepare: Prepare) -> ModelEntry:
    """Fetch, verify/convert (`prepare`), install. Returns the final manifest entry (ready or failed)."""
    if request.precision is None:
        request = replace(request, precision=store_precision(settings))
    entry = weights.get(request.model_id) or weights.begin(request.entry())
    entry.precision = request.precision
    started = time.time()
    scratch = weights.temp_dir(request.model_id)
    try:
        download = fetch_source(request.source, scratch / "download", settings)
        base = weights.folder(weights.require(request.base_model, PIPELINE_CATEGORIES, "base_model").model_id) \
            if request.base_model else None
        facts = prepare(request.category, download, scratch / "built", request.precision, request.upcast_attention, base)
        for key, value in facts.items():
            setattr(entry, key, value)
        entry = weights.finish(entry, scratch / "built", started)
        log.info("model %s loaded (%s, %.1fs)", entry.model_id, entry.category, entry.load_seconds)
    except Exception as exc:  # every failure ends in a `failed` manifest with a reason
        message = _describe(exc)
        log.warning("model %s failed to load: %s", request.model_id, message)
        entry = weights.fail(entry, message)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if request.webhook:
        notify(request.webhook, load_event(entry))
    return entry


def load_event(entry: ModelEntry) -> dict:
    """The webhook payload of a finished load."""
    ok = entry.status == "ready"
    return {
        "status": "success" if ok else "failed",
        "event": "model_load",
        "model_id": entry.model_id,
        "category": entry.category,
        "message": "model loaded" if ok else entry.message,
        "load_time": entry.load_seconds,
    }


# --------------------------------------------------------------------------- fetching


def fetch_source(source: str, target: Path, settings) -> Path:
    """Bring the weights into `target` (a folder); returns the file or folder fetched."""
    target.mkdir(parents=True)
    kind = source_kind(source, settings.allow_local_model_paths)
    if kind == "url":
        path = download_file(source, target, settings)
        return _unpack(path, target) if path.name.endswith(ARCHIVE_SUFFIXES) else path
    if kind == "path":
        local = Path(source.removeprefix("file://"))
        if not local.exists():
            raise LoadError(f"local path {local} does not exist")
        if local.is_dir():
            return Path(shutil.copytree(local, target / local.name))
        return Path(shutil.copy2(local, target / local.name))
    return _hub_download(source, target, settings)


class LoadError(Exception):
    """A load failed for a reason to show the client as is."""


def download_file(url: str, target: Path, settings) -> Path:
    """Download `url` into `target` through `infra.net.fetcher` (public addresses only, unless
    allowlisted; redirects checked; at most `max_model_bytes`)."""
    cap = settings.max_model_bytes
    timeout = httpx.Timeout(settings.model_download_timeout, connect=10.0)
    try:
        with fetcher.stream(
            "GET", url, allowlist=getattr(settings, "fetch_allowlist", []), timeout=timeout
        ) as response:
            if response.status_code >= 400:
                raise LoadError(f"download failed: HTTP {response.status_code} from {url}")
            declared = int(response.headers.get("content-length") or 0)
            fetcher.check_length(response, cap)  # before a file is created
            path = target / _file_name(response)
            size = 0
            with path.open("wb") as out:
                for chunk in fetcher.iter_capped(response, cap, 1 << 20):
                    size += len(chunk)
                    out.write(chunk)
            if declared and size < declared:
                raise LoadError(f"the download ended early ({size} of {declared} bytes)")
            return path
    except fetcher.Blocked as exc:
        raise LoadError(f"download refused: {exc.message}") from None
    except fetcher.TooLarge as exc:
        if exc.declared is not None:
            raise LoadError(f"the file is {exc.declared} bytes, over this server's limit of {cap} bytes") from None
        raise LoadError(f"the file is over this server's limit of {cap} bytes") from None
    except httpx.HTTPError as exc:
        raise LoadError(f"download failed: {type(exc).__name__} for {url}") from exc


def _file_name(response: httpx.Response) -> str:
    """Content-Disposition's file name, else the URL's last path segment; never a path."""
    disposition = response.headers.get("content-disposition")
    name = ""
    if disposition:
        message = Message()
        message["content-disposition"] = disposition
        name = message.get_filename() or ""
    name = name or unquote(urlparse(str(response.url)).path.rsplit("/", 1)[-1])
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name.rsplit("/", 1)[-1]).lstrip(".")
    return name or "weights.bin"


def _unpack(archive: Path, target: Path) -> Path:
    folder = target / "unpacked"
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")  # no absolute paths, links out or devices
    except (tarfile.TarError, OSError) as exc:
        raise LoadError(f"the archive does not unpack: {exc}") from exc
    archive.unlink()
    return folder


def _hub_download(source: str, target: Path, settings) -> Path:
    """A repo (its weights: `hub_files_to_fetch`) or, for `owner/name:path,path`, only those files and
    folders, laid side by side in one folder (`hub_paths_to_fetch`, `lay_out_hub_paths`). From the
    setting hub_endpoint when set (a mirror), else huggingface_hub's own (HF_ENDPOINT)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    selected = HUB_PATHS.match(source)
    repo_id = selected["repo"] if selected else source
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise LoadError(f"this server is offline (HF_HUB_OFFLINE): it cannot download {repo_id} from the hub")
    endpoint = getattr(settings, "hub_endpoint", None) or None
    try:
        listing = HfApi(endpoint=endpoint).list_repo_files(repo_id)
        paths = selected["paths"].split(",") if selected else []
        files = hub_paths_to_fetch(listing, paths, repo_id) if selected else hub_files_to_fetch(listing)
        folder = Path(snapshot_download(repo_id, local_dir=target / repo_id.replace("/", "--"), allow_patterns=files,
                                        endpoint=endpoint))
    except RepositoryNotFoundError as exc:
        raise LoadError(f"Hugging Face repo {repo_id} does not exist or is private") from exc
    except HfHubHTTPError as exc:
        raise LoadError(f"Hugging Face hub download of {repo_id} failed: {exc}") from exc
    except LoadError:
        raise
    except Exception as exc:  # the hub client's own network errors (no internet, DNS, timeouts)
        raise LoadError(f"cannot reach the Hugging Face hub to download {repo_id}: {type(exc).__name__}") from exc
    return lay_out_hub_paths(folder, paths, target / "selected") if selected else folder


def hub_paths_to_fetch(files: list[str], paths: list[str], repo_id: str) -> list[str]:
    """Of a repo's `files`, those the `paths` name: a file itself, or a folder's weights and configs
    (`hub_files_to_fetch` of what lies under it); a path that names nothing is a LoadError."""
    chosen = []
    for path in (p.rstrip("/") for p in paths):
        if path in files:
            chosen.append(path)
            continue
        inside = hub_files_to_fetch([name for name in files if name.startswith(path + "/")])
        if not inside:
            raise LoadError(f"Hugging Face repo {repo_id} has no file or folder {path}")
        chosen += inside
    return chosen


def lay_out_hub_paths(folder: Path, paths: list[str], out: Path) -> Path:
    """The fetched `paths` of a repo snapshot in `folder`, moved side by side into `out` under their
    last names (models/image_encoder -> out/image_encoder); two of one name is a LoadError."""
    out.mkdir(parents=True)
    for path in (p.rstrip("/") for p in paths):
        name = path.rpartition("/")[2]
        if (out / name).exists():
            raise LoadError(f"two of the paths are named {name}: they cannot lie side by side")
        shutil.move(str(folder / path), out / name)
    return out


def hub_files_to_fetch(files: list[str]) -> list[str]:
    """Of a repo's files: configs, tokenizers and one set of weights per folder (.safetensors,
    else .bin), without fp16/EMA duplicates or the single-file checkpoints many diffusers repos
    also carry at their root."""
    diffusers_layout = "model_index.json" in files
    with_safetensors = {name.rpartition("/")[0] for name in files if name.endswith(".safetensors")}
    chosen = []
    for name in files:
        folder = name.rpartition("/")[0]
        if diffusers_layout and not folder and name != "model_index.json":
            continue  # v1-5-pruned.ckpt and friends: the same weights once more
        if name.endswith((".json", ".txt", ".model")):
            chosen.append(name)
        elif name.endswith(".safetensors") and not name.endswith(HUB_SKIP):
            chosen.append(name)
        elif name.endswith(".bin") and folder not in with_safetensors and ".fp16." not in name:
            chosen.append(name)
    return chosen


def _describe(exc: Exception) -> str:
    from_engine = type(exc).__name__ == "CheckpointError"
    if isinstance(exc, LoadError) or from_engine:
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
